"""KV page codec: page layout (``format``), byte reports (``report``); pure modules import no torch."""
