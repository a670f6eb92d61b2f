import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from sdb_core.train import Cancelled, TrainConfig, accuracy, fit, train_classifier


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    return TensorDataset(x, y)


def _net():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))


def test_training_learns_and_reports_progress():
    data, seen = _toy(), []
    torch.manual_seed(0)
    net = _net()
    before = accuracy(net, data)
    hist = train_classifier(net, data, TrainConfig(epochs=5, lr=0.1), progress=seen.append)
    assert accuracy(net, data) > max(before, 90.0)
    assert seen and seen[-1].fraction == pytest.approx(1.0) and seen[-1].epoch == 5
    assert len(hist.epochs) == 5 and hist.epochs[-1]["loss"] < hist.epochs[0]["loss"]
    assert hist.step_seconds > 0


def test_same_seed_same_weights():
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = _net()
        train_classifier(net, _toy(), TrainConfig(epochs=2, seed=3))
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_cooperative_cancel():
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        train_classifier(_net(), _toy(), TrainConfig(epochs=5), should_cancel=cancel)


def test_checkpoint_resumes(tmp_path):
    ckpt = tmp_path / "c.pt"
    net = _net()
    step = lambda b: F.cross_entropy(net(b[0]), b[1])
    fit(net, _toy(), step, TrainConfig(epochs=2), checkpoint=ckpt)
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2
    # A rerun with more epochs starts from epoch 2: only one epoch of history is added.
    hist = fit(net, _toy(), step, TrainConfig(epochs=3), checkpoint=ckpt)
    assert len(hist.epochs) == 1


def test_non_finite_loss_stops_with_clear_error():
    net = _net()
    with pytest.raises(FloatingPointError, match="loss became"):
        fit(net, _toy(), lambda b: net(b[0]).sum() * float("nan"), TrainConfig(epochs=1))


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="-1"):
        TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="rmsprop"):
        TrainConfig(optimizer="rmsprop")


@pytest.mark.parametrize("outside", [torch.no_grad, lambda: torch.set_grad_enabled(False), torch.inference_mode])
def test_fit_trains_under_a_callers_no_grad_or_inference_mode(outside):
    """A notebook's ``with torch.no_grad():`` (or inference_mode) around a recipe failed deep in the loop with
    "element 0 of tensors does not require grad"; the caller's mode is theirs again after."""
    torch.manual_seed(0)
    net, data = _net(), _toy()
    before = [p.detach().clone() for p in net.parameters()]
    with outside():
        train_classifier(net, data, TrainConfig(epochs=1, lr=0.1))
        assert not torch.is_grad_enabled()
    # (fit trains it where it runs: on CUDA where there is one)
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, net.parameters()))


def test_a_network_made_under_inference_mode_is_refused_in_words():
    with torch.inference_mode():
        net = _net()
        with pytest.raises(ValueError, match=r"outside torch.inference_mode\(\): it trains networks"):
            train_classifier(net, _toy(), TrainConfig(epochs=1))


@pytest.mark.parametrize("device", ["mps", "gpu", "cuda:x", "CPU", ""])
def test_a_device_train_config_does_not_take_is_refused_naming_the_field(device):
    with pytest.raises(ValueError, match=r"TrainConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        TrainConfig(device=device)
    cfg = TrainConfig(device="cpu")
    cfg.device = device  # changed after it was made: refused where the run picks its device
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        train_classifier(_net(), _toy(), cfg)


def test_the_devices_train_config_documents_are_taken():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert TrainConfig(device=device).device == device
