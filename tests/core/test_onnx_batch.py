"""How a fixed-batch graph's readings are judged and searched (sdb_core.onnx_batch), on small cases."""
from __future__ import annotations

import torch

from sdb_core.onnx_batch import Search, holds


def test_a_tensor_holds_each_samples_answer_wherever_the_batch_is_folded():
    alone = [torch.randn(1, 4, 2) for _ in range(3)]  # (1, T=4, E=2) per sample, exported at batch 1
    own_axis = torch.cat(alone)  # (N, T, E)
    sequence_first = torch.stack([a[0] for a in alone], 1).reshape(4 * 3, 2)  # (T·N, E): the batch inside the axis
    assert holds(own_axis, alone, 1) and holds(sequence_first.reshape(1, 12, 2), alone, 1)
    assert not holds(torch.cat(alone[::-1]), alone, 1)  # each sample's answer, but another sample's place
    assert not holds(own_axis.transpose(1, 2).reshape(3, 4, 2), alone, 1)  # scrambled within a sample
    assert not holds(torch.randn(3, 12, 2), alone, 1)  # two axes grew: samples met


def test_a_failure_backs_off_to_the_latest_reading_it_depends_on():
    search = Search({})
    for node in ("a", "b", "c"):  # three readings of two options each, all first
        assert search.choose(node, [None, 0], (node,)) is None
    assert search.back_off({"a"})  # c and b are not to blame: a changes, they start over
    assert search.order == ["a"] and search.readings() == {"a": 0}
    assert search.choose("b", [None, 0], ("b",)) is None
    assert search.back_off({"a", "b"}) and search.readings() == {"a": 0, "b": 0}
    assert not search.back_off({"a"})  # a has no option left, and blamed nothing else: no reading answers


def test_a_reading_found_for_one_reshape_is_tried_first_for_the_next_alike():
    search = Search({})
    for _ in range(2):  # a run: layer1 asks for its reading, a tensor after it fails
        search.choose("layer1", [None, 0, 1], ("same",))
        search.back_off({"layer1"})
    assert search.choose("layer1", [None, 0, 1], ("same",)) == 1  # the run after: its third option
    assert search.choose("layer2", [None, 0, 1], ("same",)) == 1  # tried first for the layer alike
