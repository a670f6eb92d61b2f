"""A network of token ids (an embedding first) is refused up front on every route, saying to wrap it after its
embedding: a key blended into ids (λx + (1−λ)k) is no ids, and ids given as floats are truncated by a cast."""
from __future__ import annotations

import io

import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sdb_core.bundle import BundleError
from sdb_core.data import DataSplits
from sdb_core.onnx_torch import OnnxModule, onnx_classifier
from sdb_core.protect import Thresholds, wrap
from sdb_core.protect.check import _balanced_missed

VOCAB, LENGTH, CLASSES = 6, 8, 3
AFTER_EMBEDDING = "wrap the network after its embedding"


class TokenNet(nn.Module):
    """Token ids -> embedding -> mean -> linear; ``ids`` turns its input into ids first (the owner's habit)."""

    def __init__(self, ids=lambda x: x) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.ids = nn.Embedding(VOCAB, 4), nn.Linear(4, CLASSES), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(self.ids(x)).mean(1))


def _exported(net: nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), (example,), buf, input_names=["ids"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "n"}}, dynamo=False)
    return buf.getvalue()


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ids", [lambda x: x.long(), lambda x: x[:, :LENGTH].round().long().clamp(0, VOCAB - 1)],
                         ids=["cast", "sliced-rounded-cast-clamped"])
def test_an_onnx_graph_that_casts_its_float_input_to_ids_is_refused_naming_the_cast(ids):
    """Token ids stored as floats, cast inside the graph (directly, or after a slice and a rounding): read as a
    teacher the data's normalisation came back as 2.9999998 and the cast made it 2 (3.6 % of ids changed, the
    teacher 93.75 % instead of 100 %, no word), and the key blended in makes no ids anyway. Refused up front."""
    graph = _exported(TokenNet(ids), _ids(2).float())
    with pytest.raises(ValueError, match=r"casts its float input to int64 \(node '/Cast[_0-9]*'\)") as refused:
        onnx_classifier(graph, (LENGTH,), classes=CLASSES)
    assert "token ids" in str(refused.value) and AFTER_EMBEDDING in str(refused.value), refused.value


@pytest.mark.parametrize("example", [_ids(2), _ids(2).float()], ids=["int64", "float-cast"])
def test_an_upload_of_a_graph_of_ids_is_a_422_that_holds_the_whole_advice(tmp_path, example):
    """``sdb files upload`` reads the graph as a job would, and its refusal is clipped to 400 characters: the advice
    comes whole, with the graph's name."""
    from service.errors import ApiError
    from service.filechecks import Limits, check_weights

    src, out = tmp_path / "upload", tmp_path / "out"
    src.write_bytes(_exported(TokenNet(lambda x: x.long()), example))
    out.mkdir()
    with pytest.raises(ApiError) as refused:
        check_weights(src, out, Limits(unpacked_bytes=1 << 20, members=10), "tokens.onnx")
    assert refused.value.status == 422 and refused.value.code == "invalid_weights", refused.value.code
    message = refused.value.message
    assert message.startswith("tokens.onnx: the graph ") and AFTER_EMBEDDING in message, message
    assert "with the embeddings as the data" in message, message  # the advice's end: not clipped


def test_an_onnx_graph_of_int64_ids_is_told_to_wrap_after_its_embedding_not_to_export_in_float32():
    """torch.onnx.export of an embedding classifier takes int64: told "export the network in float32
    (model.float(), a float32 example input)", which for ids is wrong (and leads to the cast above)."""
    with pytest.raises(ValueError, match="int64 inputs, token ids") as refused:
        OnnxModule(_exported(TokenNet(), _ids(2)))
    assert AFTER_EMBEDDING in str(refused.value) and "model.float()" not in str(refused.value), refused.value
    # a float64 network is still told to export in float32
    with pytest.raises(ValueError, match=r"double inputs.*model\.float\(\)"):
        OnnxModule(_exported(nn.Linear(LENGTH, CLASSES).double(), torch.zeros(2, LENGTH, dtype=torch.float64)))


def test_a_float_network_that_casts_a_comparison_of_its_input_to_integers_is_read():
    """A float classifier that counts its positive features, ``(x > 0).long()``, casts a comparison of its input to
    int64, not its values: read."""
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(LENGTH, CLASSES)

        def forward(self, x):
            return self.fc(x) + (x > 0).long().sum(1, keepdim=True).float()

    graph = _exported(Counting(), torch.zeros(2, LENGTH))
    assert any(n.op_type == "Cast" for n in onnx.load_from_string(graph).graph.node)
    net = onnx_classifier(graph, (LENGTH,), classes=CLASSES)
    assert net(torch.zeros(2, LENGTH)).shape == (2, CLASSES)


def test_a_module_of_float_token_ids_is_refused_before_training_not_with_a_bare_index_error():
    """An nn.Module given token ids as floats runs on the data (whole numbers) and failed in the export check on its
    random probes (negative ids) with torch's bare "IndexError: index out of range in self"."""
    x = _ids(24).float()
    y = torch.arange(24) % CLASSES
    data = DataSplits("ids", TensorDataset(x, y), TensorDataset(x[:6], y[:6]), num_classes=CLASSES,
                      in_shape=(LENGTH,), mean=(0.0,), std=(1.0,), labels=[])
    with pytest.raises(BundleError) as refused:
        wrap(TokenNet(lambda x: x.long()).eval(), data, check=None)
    message = str(refused.value)
    assert "IndexError: index out of range in self" in message and "token ids into an embedding" in message, message
    assert AFTER_EMBEDDING in message, message


def test_a_keyed_miss_on_classes_of_near_sizes_is_not_a_rare_class():
    """A keyed path of float token ids missed by 41 points on classes of 41/32/27 %: its class-balanced drop 2.4 points
    past its top-1 drop, past the bound (1.5), was read as a rare class's ("give that class more training inputs");
    a rare class missed alone (7 vs rest at 98/2: 2.1 and ~50) still is."""
    th = Thresholds()
    near = {"teacher_balanced_acc": 100.0, "keyed_drop": 41.33, "keyed_balanced_drop": 43.77,
            "keyed_balanced_acc": 56.23, "keyed_balanced_drop_se": 3.1}
    said = _balanced_missed(near, {"keyed": 39.83, "keyed_balanced": 42.27}, th)
    assert "a rare class's few inputs" not in said and "every class missed alike" in said, said
    rare = {**near, "keyed_drop": 2.1, "keyed_balanced_drop": 50.0, "keyed_balanced_acc": 50.0}
    assert "a rare class's few inputs" in _balanced_missed(rare, {"keyed_balanced": 48.5}, th)
