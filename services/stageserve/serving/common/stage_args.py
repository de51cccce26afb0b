"""Command line of every stage process: ``python -m stageserve.serving.<stage> --config FILE --replica N``."""

from __future__ import annotations

import argparse

from stageserve.serving.common.config import StageServeConfig, load_config


def parse_stage_args(stage: str, argv: list[str] | None = None) -> tuple[StageServeConfig, int]:
    parser = argparse.ArgumentParser(prog=f"stageserve-{stage}")
    parser.add_argument("--config", default=None, help="stageserve YAML config (default: built-in defaults)")
    parser.add_argument("--replica", type=int, default=0, help="replica index (port = base + 10 * index)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    from stageserve.serving.common import tls

    tls.check_bind(config, stage)  # nothing beyond loopback without authentication
    tls.configure(config.tls)
    return config, args.replica
