"""The model zoo: every registered model on several input shapes, errors, determinism."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdb_core.models import create_model, list_models, register_model
from sdb_core.models.resnet import CifarResNet

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These tensors are too small to gain from intra-op threads, and on a busy 2-core box two
    # threads spin against other processes and run up to 50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_zoo_has_the_documented_models():
    assert {"mlp", "cnn", "lenet", "resnet8", "resnet20", "resnet56", "wrn16_2", "wrn40_2", "vit_tiny",
            "resnet8_gn"} <= set(list_models())


@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, in_shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_shape=in_shape)
    assert model.num_classes == 7 and model.in_shape == in_shape
    x = torch.randn(3, *in_shape)
    logits = model(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("in_shape", [(2, 9, 13), (3, 64, 48)])
def test_odd_and_large_shapes(in_shape):
    for name in ("cnn", "lenet", "resnet8", "wrn16_1", "vit_tiny", "resnet8_gn"):
        assert create_model(name, 4, in_shape)(torch.randn(2, *in_shape)).shape == (2, 4)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'resnet21'") as err:
        create_model("resnet21")
    assert "resnet20" in str(err.value) and "cnn" in str(err.value)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, "10"])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match=f"num_classes.*{num_classes!r}"):
        create_model("mlp", num_classes=num_classes)


@pytest.mark.parametrize("in_shape", [(1, 7, 28), (28, 28), (0, 28, 28), (1, 28.0, 28), 28])
def test_bad_in_shape(in_shape):
    with pytest.raises(ValueError, match="in_shape") as err:
        create_model("cnn", in_shape=in_shape)
    assert repr(in_shape) in str(err.value)


@pytest.mark.parametrize("name", list_models())
def test_construction_is_deterministic(name):
    def build(seed):
        torch.manual_seed(seed)
        return create_model(name, 10, (3, 32, 32)).state_dict()

    a, b, c = build(1), build(1), build(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_family_kwargs():
    mlp = create_model("mlp", 3, (1, 8, 8), hidden=[32])
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [32, 3]
    with pytest.raises(ValueError, match="hidden"):
        create_model("mlp", hidden=[])
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\), got 1.5"):
        create_model("wrn16_2", dropout=1.5)
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\), got -0.1"):
        create_model("vit_tiny", dropout=-0.1)
    with pytest.raises(TypeError):
        create_model("resnet20", dropout=0.1)  # a typo'd option must not pass silently


def test_wrn_dropout_acts_only_in_training():
    torch.manual_seed(0)
    model = create_model("wrn16_2", 10, (3, 16, 16), dropout=0.5)
    x = torch.randn(2, 3, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_vit_dropout_acts_only_in_training():
    torch.manual_seed(0)
    model = create_model("vit_tiny", 10, (1, 28, 28))  # the default dropout, 0.1
    x = torch.randn(2, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    model = create_model("vit_tiny", 10, (1, 28, 28), dropout=0.0).train()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(("in_shape", "tokens"), [((1, 8, 8), 16), ((1, 28, 28), 49), ((3, 32, 32), 64),
                                                  ((2, 9, 13), 35)])
def test_vit_patch_grid_follows_the_input(in_shape, tokens):
    model = create_model("vit_tiny", 10, in_shape)
    assert model.pos_embed.shape[1] == 1 + tokens  # the class token and one per patch
    assert isinstance(model.norm, torch.nn.LayerNorm)
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


def test_resnet8_gn_has_group_norm_and_no_batch_norm():
    model = create_model("resnet8_gn", 10, (3, 32, 32))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 7 and {m.num_groups for m in norms} == {8}
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in create_model("resnet8").modules())
    # No batch statistics: a sample's output does not depend on the rest of its batch, even in train mode.
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model.train()(x)[:1], model(x[:1]), atol=1e-5)
    with pytest.raises(ValueError, match="norm must be one of"):
        CifarResNet(8, 10, (3, 32, 32), norm="ln")


def test_register_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="cnn")


def test_cnn_learns_mnist_5k():
    from torch.utils.data import DataLoader

    from sdb_core.data import load_dataset, transfer_split

    data = load_dataset("mnist-5k")
    torch.manual_seed(0)
    model = create_model("cnn", data.num_classes, data.in_shape)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for xb, yb in DataLoader(transfer_split(data, 2000, seed=0), batch_size=64, shuffle=True):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    x, y = data.test.tensors
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85, acc


def test_an_encdec_is_read_from_its_weights_and_another_networks_are_refused_in_words():
    from sdb_core.models.encdec import EncDec, encdec_from_state

    net = EncDec(3, 5, [8, 16], 2)
    rebuilt = encdec_from_state(net.state_dict())
    rebuilt.load_state_dict(net.state_dict())  # the same shapes, every tensor
    # A classifier's weights given as a branching teacher: said so, not "min() arg is an empty sequence".
    for other in (create_model("cnn", num_classes=10, in_shape=(1, 28, 28)).state_dict(),
                  {k: v for k, v in net.state_dict().items() if not (k.startswith("stages.enc2.") and v.dim() == 4)}):
        with pytest.raises(ValueError, match=r"^not the weights of an encoder-decoder \(EncDec\): "
                           r"(0 encoder stages found|an encoder stage has no convolution)$"):
            encdec_from_state(other)
