"""The CRD may only offer what the serving stages accept: a pod given the rendered ConfigMap must start."""

from pathlib import Path

import pytest
import yaml

from stageserve.serving.common.config import ConfigError, ThrottlerConfig

CRD = Path(__file__).parents[2] / "deploy/helm/stageserve-crds/templates/stageservedeployment.yaml"


def _fairness_policies() -> list[str]:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["spec"]["properties"]["fairness"]["properties"]["policy"]["enum"]


@pytest.mark.parametrize("policy", _fairness_policies())
def test_every_crd_fairness_policy_is_accepted_by_the_throttler(policy: str) -> None:
    assert ThrottlerConfig(policy=policy).policy == policy


def test_the_throttler_rejects_a_policy_the_crd_does_not_offer() -> None:
    assert "oit" not in _fairness_policies()
    with pytest.raises(ConfigError, match="throttler.policy"):
        ThrottlerConfig(policy="oit")
