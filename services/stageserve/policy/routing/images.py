"""Where each image of a request is encoded (pure; ModServe section 4.3).

Least pending image tokens: images are placed largest first, each on the encoder replica with the fewest
pending image tokens, counting the images already placed, so one multi-image request is split across
replicas (like chunking: no replica holds the whole request while others idle). Round-robin is the
baseline the benchmark compares against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def assign_least_pending(estimates: Sequence[int], pending: Mapping[str, int]) -> list[str]:
    """Replica address per image (in the images' order). ``pending``: image tokens queued per healthy
    replica. Ties go to the replica listed first."""
    if not pending:
        raise LookupError("no healthy encoder replica")
    load = dict(pending)
    order = list(load)
    out = [""] * len(estimates)
    for i in sorted(range(len(estimates)), key=lambda j: -estimates[j]):
        address = min(order, key=lambda a: load[a])
        out[i] = address
        load[address] += estimates[i]
    return out


def assign_round_robin(count: int, replicas: Sequence[str], turn: int) -> list[str]:
    """Replica per image, cycling from position ``turn`` (the caller advances it by ``count``)."""
    if not replicas:
        raise LookupError("no healthy encoder replica")
    return [replicas[(turn + i) % len(replicas)] for i in range(count)]
