"""Pure reconciliation: (spec, previous status, loads, nodes, now) -> replicas, placement and the new status.

The autoscaler's memory lives in ``status.stages.<stage>.autoscaler``, so the operator holds no state of its
own and a restarted operator carries on where the last one stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from stageserve_operator.policy.autoscale import Decision, ScaleState, StageLoad, plan
from stageserve_operator.policy.placement import Demand, Node, Placement, place
from stageserve_operator.spec import GPU_STAGES, SCALED_STAGES, STAGE_NAMES, DeploymentSpec


@dataclass(frozen=True)
class Plan:
    replicas: dict[str, int]  # every stage
    decisions: dict[str, Decision]  # autoscaled stages that were looked at
    placement: Placement | None


def scale_state(spec: DeploymentSpec, status: dict[str, Any], stage: str) -> ScaleState:
    """The stage's autoscaler state from ``status`` (fresh from the spec when there is none)."""
    s = spec.stages[stage]
    entry = ((status or {}).get("stages") or {}).get(stage) or {}
    mem = entry.get("autoscaler") or {}
    replicas = entry.get("replicas", s.replicas)
    replicas = min(max(int(replicas), s.min_replicas), s.max_replicas)
    return ScaleState(
        replicas=replicas,
        last_plan_at=mem.get("lastPlanAt"),
        last_change_at=mem.get("lastChangeAt"),
        below_since=mem.get("belowSince"),
        below_max=int(mem.get("belowMax", 0)),
        scaled_up_at=mem.get("lastScaleUpAt"),
    )


def current_replicas(spec: DeploymentSpec, status: dict[str, Any]) -> dict[str, int]:
    """Replicas per stage without planning: the autoscaler's last word for autoscaled stages, else the spec."""
    out = {}
    for stage in STAGE_NAMES:
        s = spec.stages[stage]
        if spec.autoscaling.enabled and s.autoscaled:
            out[stage] = scale_state(spec, status, stage).replicas
        else:
            out[stage] = s.replicas
    return out


def reconcile(
    spec: DeploymentSpec,
    status: dict[str, Any],
    loads: dict[str, StageLoad],
    now: float,
    nodes: list[Node] | None = None,
) -> Plan:
    """Plans every autoscaled stage that has a load reading, then places GPU replicas when nodes are known."""
    replicas = current_replicas(spec, status)
    decisions: dict[str, Decision] = {}
    if spec.autoscaling.enabled:
        for stage in SCALED_STAGES:
            if spec.stages[stage].autoscaled and stage in loads:
                d = plan(stage, loads[stage], scale_state(spec, status, stage), now, spec.scale_policy(stage))
                decisions[stage], replicas[stage] = d, d.replicas
    placement = None
    if nodes:
        demands = {st: Demand(replicas[st], spec.stages[st].gpus) for st in GPU_STAGES if spec.stages[st].gpus > 0}
        placement = place(nodes, demands)
    return Plan(replicas, decisions, placement)


def render_status(
    spec: DeploymentSpec,
    previous: dict[str, Any],
    result: Plan,
    loads: dict[str, StageLoad],
    now: float,
    generation: int | None = None,
) -> dict[str, Any]:
    """The ``status`` to patch: per stage replicas/desired/load/reason, the placement, the autoscaler memory."""
    stages: dict[str, Any] = {}
    old = (previous or {}).get("stages") or {}
    for stage in STAGE_NAMES:
        entry: dict[str, Any] = dict(old.get(stage) or {})
        entry["replicas"] = result.replicas[stage]
        d = result.decisions.get(stage)
        if d is not None:
            entry.update(desired=d.recommended, reason=d.reason, autoscaler=_memory(d.state))
            if d.planned:
                entry["lastPlanTime"] = _rfc3339(now)
        else:
            entry.setdefault("desired", result.replicas[stage])
            entry.setdefault("reason", "fixed replicas" if not spec.stages[stage].autoscaled else "no metrics yet")
        if stage in loads:
            entry["load"] = _load_dict(loads[stage])
        if stage in SCALED_STAGES:
            entry["capacityTokensPerSecond"] = spec.scale_policy(stage).capacity_tokens_per_s
        stages[stage] = entry
    status: dict[str, Any] = {"stages": stages, "lastReconcileTime": _rfc3339(now)}
    if result.placement is not None:
        status["placement"] = {
            "nodes": {st: dict(result.placement.nodes_of(st)) for st in result.placement.assignments},
            "unplaced": dict(result.placement.unplaced),
            "freeGpus": dict(result.placement.free_gpus),
        }
    if generation is not None:
        status["observedGeneration"] = generation
    status["summary"] = " ".join(f"{st}={result.replicas[st]}" for st in SCALED_STAGES)
    return status


def _memory(state: ScaleState) -> dict[str, Any]:
    mem: dict[str, Any] = {"belowMax": state.below_max}
    for key, value in (("lastPlanAt", state.last_plan_at), ("lastChangeAt", state.last_change_at),
                       ("belowSince", state.below_since), ("lastScaleUpAt", state.scaled_up_at)):
        if value is not None:
            mem[key] = value
    return mem


def _load_dict(load: StageLoad) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokensPerSecond": round(load.tokens_per_s, 3),
        "pendingTokens": round(load.pending_tokens, 3),
        "runningSeqs": round(load.running_seqs, 3),
        "kvUsage": round(load.kv_usage, 4),
    }
    if load.slo_attainment is not None:
        out["sloAttainment"] = round(load.slo_attainment, 4)
    return out


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
