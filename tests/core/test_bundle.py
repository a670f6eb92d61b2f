import json
import zipfile

import numpy as np
import pytest
import torch

from sdb_core.bundle import BundleError, export_bundle, load_bundle
from sdb_core.protect import NastyConfig, SDBConfig, SealError, train_box, wrap_nasty
from sdb_core.protect.key import new_master_key
from sdb_core.train import TrainConfig

from .conftest import OutsideNet


@pytest.fixture(scope="module")
def box(digits, digits_teacher):
    return train_box(digits_teacher, digits, SDBConfig(train=TrainConfig(epochs=1))).box


@pytest.fixture(scope="module")
def master():
    return new_master_key()


def _export(box, digits, out, master):
    return export_bundle(box, out, name="digits-test", in_shape=digits.in_shape, mean=digits.mean,
                         std=digits.std, labels=digits.labels, master_key=master, metrics={"public_acc": 1.0})


@pytest.mark.parametrize("suffix", ["", ".sdb"])
def test_round_trip_and_onnx_parity(tmp_path, digits, box, master, suffix):
    path = _export(box, digits, tmp_path / f"b{suffix}", master)
    b = load_bundle(path, master)
    assert b.meta["name"] == "digits-test" and b.meta["input"]["shape"] == [1, 8, 8]
    assert b.meta["labels"] == digits.labels and b.has_key
    x = digits.test.tensors[0][:37]
    public = b.public_logits(x.numpy())
    keyed = b.distill_logits(x.numpy())
    assert np.abs(public - box.public_logits(x).numpy()).max() <= 1e-4
    assert np.abs(keyed - box.distill_logits(x).numpy()).max() <= 1e-4
    assert np.abs(public - keyed).max() > 1e-2
    assert np.allclose(b.predict(x.numpy()).sum(1), 1.0, atol=1e-5)


def test_key_never_in_the_public_graph_or_meta(tmp_path, digits, box, master):
    path = _export(box, digits, tmp_path / "b", master)
    key = box.reveal_key().numpy().astype(np.float32).tobytes()
    for f in path.iterdir():
        assert key not in f.read_bytes(), f.name
    public_only = load_bundle(path)  # no master key: predictions, no keyed path
    assert not public_only.has_key
    with pytest.raises(PermissionError):
        public_only.distill_logits(digits.test.tensors[0][:1].numpy())
    assert "hidden" in repr(load_bundle(path, master))


def test_tampered_files_are_refused(tmp_path, digits, box, master):
    path = _export(box, digits, tmp_path / "b", master)
    model = bytearray((path / "model.onnx").read_bytes())
    model[len(model) // 2] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(model))
    with pytest.raises(BundleError, match="model.onnx was altered"):
        load_bundle(path, master)

    path = _export(box, digits, tmp_path / "c", master)
    meta = json.loads((path / "meta.json").read_text())
    meta["lam"] = 0.9  # hashes intact, but the sealed key is bound to the metadata
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SealError, match="altered"):
        load_bundle(path, master)

    path = _export(box, digits, tmp_path / "d", master)
    (path / "key.sealed").unlink()
    with pytest.raises(BundleError, match="key.sealed is missing"):
        load_bundle(path, master)
    with pytest.raises(SealError, match="wrong master key"):
        load_bundle(_export(box, digits, tmp_path / "e", master), new_master_key())


def test_malformed_bundles(tmp_path):
    with pytest.raises(BundleError, match="no bundle"):
        load_bundle(tmp_path / "missing")
    (tmp_path / "junk.sdb").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="neither"):
        load_bundle(tmp_path / "junk.sdb")
    with zipfile.ZipFile(tmp_path / "empty.sdb", "w") as z:
        z.writestr("meta.json", "{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "empty.sdb")


def test_nasty_and_outside_models_export(tmp_path, digits):
    net = OutsideNet(64, digits.num_classes)
    nasty = wrap_nasty(net, digits, NastyConfig(train=TrainConfig(epochs=1))).box
    path = export_bundle(nasty, tmp_path / "n", name="n", in_shape=digits.in_shape, mean=digits.mean,
                         std=digits.std, labels=digits.labels, master_key=None)
    b = load_bundle(path, new_master_key())
    assert not b.has_key and not (path / "key.sealed").exists()
    x = digits.test.tensors[0][:5]
    assert np.abs(b.public_logits(x.numpy()) - nasty.public_logits(x).numpy()).max() <= 1e-4


def test_plain_module_exports_with_any_output_shape_and_free_spatial_axes(tmp_path):
    # A fully convolutional net (a pose or style model, say): no key, output not a label vector.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    path = export_bundle(net, tmp_path / "p", name="p", in_shape=(3, 16, 16), mean=[0.0] * 3, std=[1.0] * 3,
                         task="pose", dynamic_spatial=True)
    b = load_bundle(path, new_master_key())
    assert b.meta["mode"] == "plain" and b.meta["task"] == "pose" and not b.has_key
    assert b.meta["output"]["shape"] == [2, 16, 16]
    x = torch.rand(3, 3, 24, 20)  # another size than exported: the spatial axes are free
    with torch.no_grad():
        want = net(x).numpy()
    assert np.abs(b.public_logits(x.numpy()) - want).max() <= 1e-4


def test_unknown_mode_is_refused(tmp_path):
    net = torch.nn.Linear(4, 2)
    path = export_bundle(net, tmp_path / "m", name="m", in_shape=(4,), mean=[0.0], std=[1.0])
    meta = json.loads((path / "meta.json").read_text())
    meta["mode"] = "open-sesame"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unknown mode"):
        load_bundle(path)
