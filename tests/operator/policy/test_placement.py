"""Stage colocation: encoders on GPUs text stages leave idle, prefill next to decode, never overcommit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stageserve_operator.policy.placement import Demand, Node, place


def test_modserve_mix_one_tp4_text_plus_two_tp2_encoders_per_8_gpu_node():
    nodes = [Node("a", 8), Node("b", 8)]
    p = place(nodes, {"decode": Demand(2, 4), "encoder": Demand(4, 2)})
    assert p.nodes_of("decode") == {"a": 1, "b": 1}
    assert p.nodes_of("encoder") == {"a": 2, "b": 2}
    assert p.free_gpus == {"a": 0, "b": 0} and not p.unplaced


def test_prefill_lands_next_to_its_decode_peers():
    nodes = [Node("a", 8), Node("b", 8), Node("c", 8)]
    p = place(nodes, {"decode": Demand(2, 2), "prefill": Demand(2, 2)})
    decode_nodes = set(p.nodes_of("decode"))
    assert set(p.nodes_of("prefill")) == decode_nodes  # one prefill beside each decode
    assert len(decode_nodes) == 2  # decode spread over nodes with the most free GPUs


def test_encoders_fill_idle_gpus_of_text_nodes_before_empty_nodes():
    nodes = [Node("empty", 8), Node("text", 8)]
    p = place([Node("text", 8), Node("empty", 8)], {"decode": Demand(1, 4), "prefill": Demand(1, 2),
                                                     "encoder": Demand(3, 1)})
    assert p.nodes_of("decode") == {"text": 1} and p.nodes_of("prefill") == {"text": 1}
    assert p.nodes_of("encoder") == {"text": 2, "empty": 1}
    assert nodes  # both node orders are valid inputs


def test_never_overcommits_and_reports_what_does_not_fit():
    p = place([Node("a", 4)], {"decode": Demand(1, 4), "prefill": Demand(1, 1), "encoder": Demand(2, 1)})
    assert p.unplaced == {"prefill": 1, "encoder": 2}
    assert p.free_gpus == {"a": 0}


def test_bad_inputs():
    with pytest.raises(ValueError, match="gateway"):
        place([Node("a", 1)], {"gateway": Demand(1)})
    with pytest.raises(ValueError, match="unique"):
        place([Node("a", 1), Node("a", 2)], {})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=6),
       st.dictionaries(st.sampled_from(["encoder", "prefill", "decode"]),
                       st.tuples(st.integers(0, 10), st.sampled_from([1, 2, 4])), max_size=3))
def test_gpu_accounting_holds_for_any_cluster(gpus, raw):
    nodes = [Node(f"n{i}", g) for i, g in enumerate(gpus)]
    demands = {s: Demand(r, g) for s, (r, g) in raw.items()}
    p = place(nodes, demands)
    for node in nodes:
        used = p.used_gpus(node.name, demands)
        assert used <= node.gpus and used + p.free_gpus[node.name] == node.gpus
    for s, d in demands.items():
        assert len(p.assignments.get(s, ())) + p.unplaced.get(s, 0) == d.replicas
        if p.unplaced.get(s):  # a replica is left out only if no node had room at that point
            assert all(p.free_gpus[n.name] < d.gpus_per_replica for n in nodes)
