"""Classifiers with RMS normalisation, by both routes an owner brings one: a torch network with ``nn.RMSNorm`` (or
``F.rms_norm``), which the box exports with the TorchScript exporter at opset 17 (it has no ``aten::rms_norm``), and
an ONNX graph with ONNX's ``RMSNormalization`` (opset 23, what torch's dynamo exporter writes for ``nn.RMSNorm``) or
ONNX Runtime's ``SimplifiedLayerNormalization`` (what its transformer optimizer fuses an RMSNorm into)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sdb_core.bundle import export_onnx, load_bundle
from sdb_core.onnx_torch import OnnxModule, onnx_classifier
from sdb_core.protect import CheckConfig, SDBConfig, Thresholds, wrap
from sdb_core.protect.key import new_master_key
from sdb_core.tasks import ModelRef
from sdb_core.tasks import wrap as wrap_task
from sdb_core.tasks.wrap import WrapTask
from sdb_core.train import TrainConfig, seed_everything, train_classifier

from .test_teachers_as_users_bring_them import _bundle_answers_as_the_box

ONE_EPOCH = SDBConfig(train=TrainConfig(epochs=1, lr=0.01, seed=0))
# These wraps test that the network is read and exported, not the recipe's self-check (the benchmarks measure it)
LAX = CheckConfig(thresholds=Thresholds(max_accuracy_drop=100.0, max_keyed_drop=100.0, min_leak_margin=-100.0,
                                        min_guessed_key_share=-1e12), max_attempts=1, leak_check=False)


class RMSMLP(nn.Module):  # nn.RMSNorm over the features, its default eps (None: float32's machine epsilon)
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(64, 32), nn.RMSNorm(32), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(F.gelu(self.norm(self.a(x.flatten(1)))))


class RMSCNN(nn.Module):  # over (C, H, W) with no weight and its own eps; F.rms_norm with a weight on the logits
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 4, 3, padding=1), nn.RMSNorm([4, 8, 8], eps=1e-3, elementwise_affine=False)
        self.fc, self.scale = nn.Linear(4 * 16, 10), nn.Parameter(torch.linspace(0.5, 1.5, 10))

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)
        return F.rms_norm(self.fc(h.flatten(1)), [10], self.scale, 1e-5)


@pytest.mark.parametrize("make", [RMSMLP, RMSCNN])
def test_a_classifier_with_rms_norm_wraps_and_its_bundle_answers_as_the_box(digits, tmp_path, make):
    torch.manual_seed(0)
    box = wrap(make().eval(), digits, ONE_EPOCH, check=None).box
    _bundle_answers_as_the_box(box, digits, tmp_path)


def test_a_checked_wrap_of_a_trained_rms_norm_classifier_keeps_its_answers(digits):
    seed_everything(0)
    teacher = RMSMLP()
    train_classifier(teacher, digits.train, TrainConfig(epochs=3, lr=0.02, seed=0))
    box = wrap(teacher.eval(), digits, ONE_EPOCH, check=LAX).box
    x = digits.test.tensors[0]
    with torch.no_grad():
        agree = (box.public_logits(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
    assert agree > 0.8, agree


def _owners_export(net: nn.Module) -> list[str] | str:
    """What the owner's own torch.onnx.export (TorchScript, opset 17) of ``net`` writes: its operators, or its error."""
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net.eval(), (torch.zeros(2, 1, 8, 8),), buf, opset_version=17, dynamo=False)
    except Exception as e:  # noqa: BLE001 - whatever torch answers, before and after
        return type(e).__name__
    import onnx

    return sorted({n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node})


def test_the_box_export_leaves_the_owners_exporter_as_it_found_it():
    net = RMSMLP()
    before = _owners_export(net)
    export_onnx(net, (1, 8, 8))
    assert _owners_export(net) == before


def test_an_owners_own_rms_norm_symbolic_is_used_and_kept():
    def theirs(g, x, normalized_shape, weight, eps):  # x * (mean(x^2) + eps) ** -0.5 * weight, through Pow
        mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes_i=[-1], keepdims_i=1)
        eps_value = g.op("Constant", value_t=torch.tensor(torch.finfo(torch.float32).eps))
        half = g.op("Constant", value_t=torch.tensor(-0.5))
        return g.op("Mul", g.op("Mul", x, g.op("Pow", g.op("Add", mean_square, eps_value), half)), weight)

    import onnx

    net = RMSMLP()
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", theirs, 17)
    try:
        box_ops = {n.op_type for n in onnx.load_from_string(export_onnx(net, (1, 8, 8))).graph.node}
        assert "Pow" in box_ops
        assert "Pow" in _owners_export(net)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", 17)


# ------------------------------------------------------------------------------------------- the ONNX reader
def _graph(nodes, initializers: dict, opset: int, output: str = "y") -> bytes:
    """A graph on a float input x (N, 8, 3, 3) answering ``output``, at ``opset`` of ONNX's domain."""
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 3, 3])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10).SerializeToString()


def _scale(shape) -> dict:
    return {"scale": np.random.default_rng(1).uniform(0.5, 2.0, shape).astype(np.float32)}


# (RMSNormalization's attributes as the specification defines them: axis, the first normalised axis, default -1;
# epsilon, default 1e-5; stash_type, the type of the first stage, default 1: float32)
GRAPHS = {
    "rms_normalization_defaults": lambda: _graph([helper.make_node("RMSNormalization", ["x", "scale"], ["y"])],
                                                 _scale((3,)), 23),
    "rms_normalization_axis_1": lambda: _graph([helper.make_node(
        "RMSNormalization", ["x", "scale"], ["y"], axis=1, epsilon=0.5, stash_type=1)], _scale((8, 3, 3)), 23),
    "rms_normalization_axis_-2": lambda: _graph([helper.make_node(
        "RMSNormalization", ["x", "scale"], ["y"], axis=-2, epsilon=1e-3)], _scale((1, 3)), 23),
    # ONNX Runtime's, in ONNX's domain as it registers and writes it; its optional inv_std_var read too
    "simplified_layer_normalization": lambda: _graph([helper.make_node(
        "SimplifiedLayerNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-3)], _scale((3,)), 17),
    "simplified_layer_normalization_inv_std_var": lambda: _graph([
        helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["n", "inv"], axis=2, stash_type=1),
        helper.make_node("Add", ["n", "inv"], ["z"])], _scale((3, 3)), 17, output="z"),
}


def _input() -> np.ndarray:
    return (np.random.default_rng(0).normal(size=(4, 8, 3, 3)) * 2).astype(np.float32)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_rms_normalization_answers_as_onnx_runtime(name):
    graph, x = GRAPHS[name](), _input()
    want = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = OnnxModule(graph)(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_rms_normalization_exports_again_as_a_box_is_exported(name):
    """As a box's teacher the graph is exported again at opset 17 (export_onnx checks it against ONNX Runtime)."""
    module, x = OnnxModule(GRAPHS[name](), fold=True).eval(), _input()
    got = ort.InferenceSession(export_onnx(module, (8, 3, 3)), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5), np.abs(got - want).max()


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_rms_normalization_runs_where_its_input_is(name):
    from .test_devices import META

    graph = OnnxModule(GRAPHS[name]()).to(META)
    with torch.no_grad():
        assert graph(torch.randn(4, 8, 3, 3, device=META)).device == META


def _rms_teacher_graph(digits) -> bytes:
    """An MLP trained on digits, written as torch's dynamo exporter writes nn.RMSNorm: RMSNormalization, opset 23."""
    seed_everything(0)
    net = RMSMLP()
    train_classifier(net, digits.train, TrainConfig(epochs=3, lr=0.02, seed=0))
    w = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    nodes = [helper.make_node("Flatten", ["image"], ["f"]),
             helper.make_node("Gemm", ["f", "a.weight", "a.bias"], ["h"], transB=1),
             helper.make_node("RMSNormalization", ["h", "norm.weight"], ["n"], axis=-1,
                              epsilon=float(torch.finfo(torch.float32).eps)),
             helper.make_node("Gelu", ["n"], ["g"]),
             helper.make_node("Gemm", ["g", "b.weight", "b.bias"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "rms_mlp", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10).SerializeToString()


def test_an_onnx_teacher_with_rms_normalization_wraps_into_a_box_that_serves_it(digits, tmp_path):
    graph = _rms_teacher_graph(digits)
    x = digits.test.tensors[0]
    want = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        got = onnx_classifier(graph, digits.in_shape)(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    path = tmp_path / "teacher.onnx"
    path.write_bytes(graph)
    out = wrap_task.run(WrapTask(data="digits", teacher=ModelRef(weights=str(path)), sdb=ONE_EPOCH, check=LAX),
                        tmp_path / "box", master_key=new_master_key())
    served = load_bundle(out.bundle).public_logits(x.numpy()).argmax(1)
    assert (served == want.argmax(1)).mean() > 0.8
