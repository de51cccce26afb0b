"""Command line of every stage process: ``python -m stageserve.serving.<stage> --config FILE --replica N``."""

from __future__ import annotations

import argparse

from stageserve.serving.common.config import StageServeConfig, load_config


def parse_stage_args(stage: str, argv: list[str] | None = None) -> tuple[StageServeConfig, int]:
    parser = argparse.ArgumentParser(prog=f"stageserve-{stage}")
    parser.add_argument("--config", default=None, help="stageserve YAML config (default: built-in defaults)")
    parser.add_argument("--replica", type=int, default=0, help="replica index (port = base + 10 * index)")
    args = parser.parse_args(argv)
    return load_config(args.config), args.replica
