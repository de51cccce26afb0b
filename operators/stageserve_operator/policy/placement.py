"""Stage colocation (ModServe §4.4): which node each GPU replica goes to, never overcommitting a GPU.

Order and rules:
1. decode replicas first, spread over the nodes with the most free GPUs (memory-bound, long-lived);
2. prefill replicas next to their decode peers: nodes hosting decode come first, so KV pages stay on the node;
3. encoder replicas last, onto the GPUs prefill/decode left idle on nodes that already run text stages
   (embeddings stay on the node, compute-bound encode pairs with memory-bound decode), then anywhere.
A replica that does not fit on any node is reported as unplaced, never squeezed in. Inputs are plain
values; the same inputs always give the same placement (nodes are visited in a fixed order).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

PLACEMENT_ORDER = ("decode", "prefill", "encoder")


@dataclass(frozen=True)
class Node:
    name: str
    gpus: int  # allocatable GPUs


@dataclass(frozen=True)
class Demand:
    replicas: int
    gpus_per_replica: int = 1


@dataclass(frozen=True)
class Placement:
    assignments: dict[str, tuple[str, ...]]  # stage -> node of each placed replica
    unplaced: dict[str, int] = field(default_factory=dict)  # stage -> replicas that did not fit
    free_gpus: dict[str, int] = field(default_factory=dict)  # node -> GPUs left

    def nodes_of(self, stage: str) -> Counter[str]:
        return Counter(self.assignments.get(stage, ()))

    def used_gpus(self, node: str, demands: dict[str, Demand]) -> int:
        return sum(demands[s].gpus_per_replica * self.nodes_of(s)[node] for s in self.assignments)


def place(nodes: list[Node], demands: dict[str, Demand]) -> Placement:
    """Assigns every replica of ``demands`` (encoder/prefill/decode) to a node with enough free GPUs."""
    for stage in demands:
        if stage not in PLACEMENT_ORDER:
            raise ValueError(f"demands: placement covers {', '.join(PLACEMENT_ORDER)}, got {stage!r}")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError("nodes: node names must be unique")
    free = {n.name: n.gpus for n in nodes}
    assignments: dict[str, list[str]] = {}
    unplaced: dict[str, int] = {}
    for stage in PLACEMENT_ORDER:
        demand = demands.get(stage)
        if demand is None:
            continue
        placed = assignments.setdefault(stage, [])
        for _ in range(demand.replicas):
            node = _pick(stage, demand.gpus_per_replica, names, free, assignments)
            if node is None:
                unplaced[stage] = unplaced.get(stage, 0) + 1
                continue
            free[node] -= demand.gpus_per_replica
            placed.append(node)
    return Placement({s: tuple(v) for s, v in assignments.items()}, unplaced, free)


def _pick(stage: str, need: int, names: list[str], free: dict[str, int], placed: dict[str, list[str]]) -> str | None:
    fits = [n for n in names if free[n] >= need]
    if not fits:
        return None
    order = {n: i for i, n in enumerate(names)}
    if stage == "decode":  # spread: most free GPUs first
        return min(fits, key=lambda n: (-free[n], order[n]))
    if stage == "prefill":  # near decode peers: most decode replicas per prefill already there
        decode, prefill = Counter(placed.get("decode", ())), Counter(placed.get("prefill", ()))
        return min(fits, key=lambda n: (-(decode[n] - prefill[n]), -decode[n], -free[n], order[n]))
    # encoder: fill idle GPUs of nodes that run text stages, tightest fit first, then empty nodes
    text = Counter(placed.get("decode", ())) + Counter(placed.get("prefill", ()))
    return min(fits, key=lambda n: (0 if text[n] else 1, free[n], order[n]))


def node_affinity(nodes: Counter[str]) -> dict:
    """A pod ``affinity`` that requires the placement's nodes and prefers each in proportion to its replicas."""
    if not nodes:
        return {}
    names = sorted(nodes)
    total = sum(nodes.values())
    preferred = [
        {
            "weight": max(1, round(100 * nodes[n] / total)),
            "preference": {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [n]}]},
        }
        for n in names
    ]
    required = {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": names}]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required,
                             "preferredDuringSchedulingIgnoredDuringExecution": preferred}}
