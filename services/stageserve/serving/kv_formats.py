"""Which KV formats the services can move today, re-exported for the shells."""

from stageserve.kvcodec.wire import WIRE_FORMATS

__all__ = ["WIRE_FORMATS"]
