"""Teachers whose copy is not a plain ``copy.deepcopy``: a TorchScript submodule inside an ``nn.Module``, old-style
``weight_norm``/``spectral_norm`` and ``torch.nn.utils.prune`` hooks whose last forward ran with autograd on, and a
forward computing under ``torch.autocast``. Each copies into a trainable copy that answers what the owner's model
does, or is refused in words; the owner's model is left as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sdb_core.bundle import BundleError, export_onnx
from sdb_core.protect.teacher import check_teacher, copy_teacher


def _body() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))


class WithSubmodule(nn.Module):
    """A plain module holding a compiled-for-deployment (scripted or traced) body."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 10))

    def forward(self, x):
        return self.head(self.body(x))


def _scripted() -> nn.Module:
    return WithSubmodule(torch.jit.script(_body().eval()))


def _traced() -> nn.Module:
    return WithSubmodule(torch.jit.trace(_body().eval(), torch.zeros(2, 1, 8, 8)))


@pytest.mark.parametrize("make", [_scripted, _traced], ids=["script", "trace"])
def test_a_torchscript_submodule_copies_into_a_trainable_copy(make, digits):
    # Before: copy.deepcopy gave the submodule's parameters as non-leaves, and the wrap crashed setting
    # requires_grad on them ("you can only change requires_grad flags of leaf variables").
    torch.manual_seed(0)
    teacher = make().eval()
    given = {k: v.clone() for k, v in teacher.state_dict().items()}
    net = check_teacher(teacher, digits.checked())
    clone = copy_teacher(net)
    assert all(p.is_leaf for p in clone.parameters())
    for p in clone.parameters():
        p.requires_grad_(True)
    x = digits.train.tensors[0][:5]
    with torch.no_grad():
        assert torch.allclose(clone.eval()(x), teacher(x))
    clone.train()(x).sum().backward()  # it trains, its own parameters
    assert all(p.grad is not None for p in clone.parameters())
    assert not {id(p) for p in clone.parameters()} & {id(p) for p in teacher.parameters()}
    assert all(torch.equal(v, given[k]) for k, v in teacher.state_dict().items())


def _weight_norm() -> nn.Module:
    return nn.Sequential(nn.utils.weight_norm(nn.Conv2d(1, 4, 3, padding=1)), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 64, 10))


def _spectral_norm() -> nn.Module:
    return nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(1, 4, 3, padding=1)), nn.ReLU(), nn.Flatten(),
                         nn.utils.spectral_norm(nn.Linear(4 * 64, 10)))


def _pruned() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    prune.l1_unstructured(net[3], "weight", amount=0.5)  # as prune leaves it: weight computed with autograd on
    return net


@pytest.mark.parametrize("make", [_scripted, _traced], ids=["script", "trace"])
def test_a_network_with_a_torchscript_submodule_exports_and_runs_in_onnx_runtime(make):
    # Before: the exporter's trace met the submodule ("not part of the active trace"), a BundleError for any such
    # teacher's box. The export is checked against the network by ONNX Runtime (_check_export), at any batch size.
    import onnxruntime as ort

    torch.manual_seed(0)
    net = make().eval()
    session = ort.InferenceSession(export_onnx(net, (1, 8, 8)), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = net(x).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert got.shape == (5, 10) and abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("make", [_weight_norm, _spectral_norm, _pruned], ids=["weight_norm", "spectral_norm", "prune"])
def test_hooks_weights_computed_with_autograd_on_do_not_stop_the_copy(make, digits):
    # Before: the weight those hooks keep as a plain attribute was a non-leaf tensor after a grad-enabled forward
    # (the owner's last training step) or right after prune, and copy.deepcopy refused it.
    torch.manual_seed(0)
    teacher = make()
    x = digits.train.tensors[0][:5]
    if make is not _pruned:
        teacher(x).sum().backward()  # the owner's last training step
    teacher.eval()
    computed = {name: m.weight for name, m in teacher.named_modules() if "weight" in m.__dict__}
    assert computed and all(w.grad_fn is not None for w in computed.values())
    given = {k: v.clone() for k, v in teacher.state_dict().items()}
    net = check_teacher(teacher, digits.checked())
    clone = copy_teacher(net)
    # The owner's model is left as it was: its state and the very tensors its hooks computed.
    assert all(torch.equal(v, given[k]) for k, v in teacher.state_dict().items())
    assert all(m.__dict__["weight"] is computed[name] for name, m in teacher.named_modules() if name in computed)
    assert all(p.is_leaf for p in clone.parameters())
    with torch.no_grad():
        assert torch.allclose(clone.eval()(x), teacher(x))


class Autocast(nn.Module):
    """Float32 parameters, a forward computing in bfloat16 (torch.autocast on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.m(x)


def test_a_forward_under_autocast_is_a_bundle_error_naming_onnx_runtime():
    # Before: ONNX Runtime's own InvalidGraph escaped the export check, which promises a BundleError.
    with pytest.raises(BundleError, match="ONNX Runtime") as e:
        export_onnx(Autocast().eval(), (1, 8, 8))
    assert "autocast" in str(e.value)
