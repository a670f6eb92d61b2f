"""``npz:PATH``: images and labels from an ``.npz``, read without pickle, with a fixed split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdb_core.data import DatasetError, list_datasets, load_dataset
from sdb_core.data.npz import describe_npz


def write(path, **arrays):
    np.savez_compressed(path, **arrays)
    return path


def test_npz_is_registered_and_splits_80_20_stratified(tmp_path):
    assert "npz" in list_datasets()
    x = np.stack([np.full((6, 6), 20 * c, np.uint8) for c in np.arange(30) % 3])
    data = load_dataset(f"npz:{write(tmp_path / 'd.npz', x=x, y=np.arange(30) % 3)}")
    assert (len(data.train), len(data.test), data.num_classes, data.in_shape) == (24, 6, 3, (1, 6, 6))
    assert data.labels == ["0", "1", "2"] and np.bincount(data.test.tensors[1].numpy()).tolist() == [2, 2, 2]
    # the split is fixed: the same file gives the same test set whatever the seed
    again = load_dataset(f"npz:{tmp_path / 'd.npz'}", seed=7)
    assert np.array_equal(data.test.tensors[0].numpy(), again.test.tensors[0].numpy())


def test_npz_with_its_own_test_split_labels_and_colour(tmp_path):
    rng = np.random.default_rng(0)
    path = write(tmp_path / "c.npz", x=rng.random((8, 3, 4, 4), np.float32), y=np.arange(8) % 2,
                 x_test=rng.random((4, 3, 4, 4), np.float32), y_test=np.array([0, 1, 1, 0]),
                 labels=np.array(["no", "yes"]))
    data = load_dataset(f"npz:{path}", image_size=8)
    assert (len(data.train), len(data.test), data.labels, data.in_shape) == (8, 4, ["no", "yes"], (3, 8, 8))
    assert describe_npz(path) == {"samples": 8, "shape": [3, 4, 4], "classes": 2, "splits": "x_test"}


def test_sixteen_bit_images_are_read_over_their_depth(tmp_path):
    """uint16 pixels are 0..65535, as a served 16-bit PNG is read: they were divided by 255, 257 times the scale
    of the same images served, which the bundle's normalisation (pixel / 255 - mean) / std then served wrong."""
    eight = np.random.default_rng(0).integers(0, 256, (20, 1, 5, 5), dtype=np.uint8)
    y = np.arange(20) % 2
    a = load_dataset(f"npz:{write(tmp_path / 'a.npz', x=eight, y=y)}")
    b = load_dataset(f"npz:{write(tmp_path / 'b.npz', x=eight.astype(np.uint16) * 257, y=y)}")
    assert np.allclose(a.mean, b.mean) and np.allclose(a.std, b.std)
    assert torch.allclose(a.train.tensors[0], b.train.tensors[0], atol=1e-5)


def test_big_endian_sixteen_bit_pixels_are_read_over_their_depth_and_wider_ones_refused(tmp_path):
    """'>u2' pixels (FITS, MATLAB, network order) are not np.uint16: they were divided by 255, 257 times too bright;
    uint32 and uint64 pixels passed the check and were divided by 255 too."""
    eight = np.random.default_rng(0).integers(0, 256, (20, 1, 5, 5), dtype=np.uint8)
    y = np.arange(20) % 2
    a = load_dataset(f"npz:{write(tmp_path / 'a.npz', x=eight, y=y)}")
    big = (eight.astype(np.uint16) * 257).astype(">u2")
    b = load_dataset(f"npz:{write(tmp_path / 'b.npz', x=big, y=y)}")
    assert np.allclose(a.mean, b.mean) and np.allclose(a.std, b.std)
    assert torch.allclose(a.train.tensors[0], b.train.tensors[0], atol=1e-5)
    for wide in (np.uint32, np.uint64, ">u4"):
        path = write(tmp_path / "w.npz", x=eight.astype(wide), y=y)
        words = r"uint(32|64) pixels; image pixels are uint8 .* x.astype\(np.uint16\)"
        with pytest.raises(DatasetError, match=words):
            describe_npz(path, whole=True)  # the upload's check
        with pytest.raises(DatasetError, match=words):
            load_dataset(f"npz:{path}")
    # as features (N, D), any integer is a value of its own scale (standardised): still read
    assert load_dataset(f"npz:{write(tmp_path / 'f.npz', x=eight.reshape(20, -1).astype(np.uint32), y=y)}").in_shape == (25,)


@pytest.mark.parametrize("labels,words", [
    (["cat", "dog", "cat"], r"two classes are named 'cat' \(classes 0 and 2\)"),
    (["caf\u00e9", "cafe\u0301"], r"two classes are named .* \(classes 0 and 1\)"),  # composed and decomposed
    (["cat", "", "dog"], r"class 1 has a blank name"),
    (["cat", "  "], r"class 1 has a blank name"),
    (["cat", "\x1b[31mdog"], r"class 1's name .* control character U\+001B"),  # a terminal's escape
    (["cat", "god\u202e"], r"class 1's name .* control character U\+202E"),  # the rest read backwards
    (["cat", "lone\ud800"], r"class 1's name .* lone surrogate"),  # no UTF-8 for it: every listing failed
], ids=["duplicate", "duplicate-nfd", "empty", "blank", "escape", "bidi", "surrogate"])
def test_class_names_must_be_distinct_named_text(tmp_path, labels, words):
    """Two classes of one name (or none) passed: a served prediction could not be told apart. Names are shown to
    other people (the console, the CLI, v2's classification strings): control characters and text UTF-8 cannot
    write are refused too; the zero-width joiners of emoji and Persian are text."""
    path = write(tmp_path / "n.npz", x=np.zeros((10, 4, 4), np.uint8), y=np.arange(10) % 2, labels=np.array(labels))
    for read in (lambda: describe_npz(path), lambda: load_dataset(f"npz:{path}")):
        with pytest.raises(DatasetError, match=words):
            read()


def test_class_names_in_any_script_are_read():
    from sdb_core.class_names import name_problem

    assert name_problem(["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f468\u200d\U0001f469",
                         "caf\u00e9", 7]) is None


def test_channels_last_images_are_read_as_pil_and_tensorflow_keep_them(tmp_path):
    rng = np.random.default_rng(0)
    first = rng.integers(0, 256, (10, 3, 5, 7), dtype=np.uint8)  # channels first, this loader's own form
    y = np.arange(10) % 2
    last = np.ascontiguousarray(first.transpose(0, 2, 3, 1))  # the same images, (N, H, W, C)
    a = load_dataset(f"npz:{write(tmp_path / 'first.npz', x=first, y=y, x_test=first[:4], y_test=y[:4])}")
    b = load_dataset(f"npz:{write(tmp_path / 'last.npz', x=last, y=y, x_test=last[:4], y_test=y[:4])}")
    assert b.in_shape == a.in_shape == (3, 5, 7) and describe_npz(tmp_path / "last.npz")["shape"] == [3, 5, 7]
    assert np.array_equal(a.train.tensors[0].numpy(), b.train.tensors[0].numpy()) and a.mean == b.mean
    with pytest.raises(DatasetError, match=r"x_test images are \[3, 5, 7\], x's are \[1, 5, 7\]"):
        load_dataset(f"npz:{write(tmp_path / 'mixed.npz', x=first[:, 0], y=y, x_test=last, y_test=y)}")
    with pytest.raises(DatasetError, match=r"\(N, H, W, C\), C 1 or 3"):  # four channels either way
        load_dataset(f"npz:{write(tmp_path / 'rgba.npz', x=np.zeros((10, 5, 7, 4), np.uint8), y=y)}")


def test_feature_vectors_are_standardised_per_feature_and_wrap_serve_and_export(tmp_path):
    # A tabular set: columns of very different scales (an age, an income, a constant flag, a count).
    rng = np.random.default_rng(0)
    y = np.arange(200) % 3
    x = np.stack([rng.normal(40, 12, 200) + 8 * y, rng.normal(5e4, 2e4, 200) * (1 + y), np.ones(200),
                  rng.poisson(3 + 2 * y)], 1)
    path = write(tmp_path / "t.npz", x=x, y=y, labels=np.array(["low", "mid", "high"]))
    data = load_dataset(f"npz:{path}")
    assert data.in_shape == (4,) and describe_npz(path)["shape"] == [4] and data.labels == ["low", "mid", "high"]
    train = data.train.tensors[0]
    assert train.dtype == torch.float32 and len(data.mean) == len(data.std) == 4 and data.std[2] == 1.0
    assert torch.allclose(train.mean(0), torch.tensor([0.0, 0.0, 0.0, 0.0]), atol=1e-4)
    assert torch.allclose(train[:, [0, 1, 3]].std(0, correction=0), torch.ones(3), atol=1e-4)
    assert torch.allclose(data.normalize(torch.from_numpy(x[:5]).float()), torch.from_numpy(
        (x[:5] - np.array(data.mean)) / np.array(data.std)).float(), atol=1e-3)
    ints = load_dataset(f"npz:{write(tmp_path / 'i.npz', x=x.round().astype(np.int64), y=y)}")
    assert ints.in_shape == (4,)
    with pytest.raises(DatasetError, match="image_size resizes images"):
        load_dataset(f"npz:{path}", image_size=8)
    with pytest.raises(DatasetError, match=r"x_test samples are \[5\], x's are \[4\]"):
        load_dataset(f"npz:{write(tmp_path / 'm.npz', x=x, y=y, x_test=np.zeros((6, 5)), y_test=y[:6])}")
    # and the zoo's shape-agnostic mlp wraps it into a bundle served like any other
    from sdb_core.bundle import export_bundle, load_bundle
    from sdb_core.models import create_model
    from sdb_core.protect import SDBConfig, wrap
    from sdb_core.protect.key import new_master_key
    from sdb_core.train import TrainConfig, train_classifier

    torch.manual_seed(0)
    teacher = create_model("mlp", num_classes=3, in_shape=data.in_shape)
    train_classifier(teacher, data.train, TrainConfig(epochs=5, lr=0.05))
    box = wrap(teacher, data, SDBConfig(train=TrainConfig(epochs=2, grad_clip=5.0)), check=None).box
    master = new_master_key()
    bundle = load_bundle(export_bundle(box, tmp_path / "b", name="t", in_shape=data.in_shape, mean=data.mean,
                                       std=data.std, labels=data.labels, master_key=master), master)
    assert bundle.meta["input"]["shape"] == [4] and bundle.predict(data.test.tensors[0][:7].numpy()).shape == (7, 3)


@pytest.mark.parametrize("arrays,words", [
    ({"x": np.zeros((4, 4, 4))}, "no array 'y'"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "extra": np.zeros(1)}, "does not read"),
    ({"x": np.zeros((4, 4, 4), complex), "y": np.zeros(4, int)}, "uint8 or uint16 pixels or floats"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4)}, "integer labels"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "x_test": np.zeros((2, 4, 4))}, "come together"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "x_test": np.zeros((2, 5, 5)), "y_test": np.zeros(2, int)},
     "x_test images are"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "labels": np.array([1, 2])}, "class names"),
    ({"x": np.zeros((2, 4, 4)), "y": np.zeros(2, int)}, "too few"),
    ({"x": np.array([None] * 4, dtype=object), "y": np.zeros(4, int)}, "pickle"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "layout": np.array("series")}, "layout 'series' is not one"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int), "layout": np.array([1])}, "layout is one string"),
    ({"x": np.zeros((4, 2, 4, 4)), "y": np.zeros(4, int), "layout": np.array("signals")}, "signals are"),
], ids=["no-y", "extra", "complex", "float-labels", "half-test", "test-shape", "labels", "too-few", "objects",
        "layout-unknown", "layout-not-a-string", "layout-signals-4d"])
def test_bad_npz_is_refused_with_the_reason(tmp_path, arrays, words):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=words):
        load_dataset(f"npz:{path}")


def test_an_archive_that_lies_about_its_array_size_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "lie.npz"
    write(path, x=np.zeros((5, 4, 4), np.uint8), y=np.zeros(5, int))
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["x.npy"] = members["x.npy"][:-8]  # the header says 80 bytes of pixels; 72 follow
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(DatasetError, match="not the size its header says"):
        describe_npz(path)


def test_signals_are_read_channel_by_channel_when_the_archive_says_so(tmp_path):
    """(N, C, L) is grayscale images unless ``layout`` says signals: then each channel is standardised over its
    length, whatever its scale, and a 1-d network (here as ONNX) takes the samples as they are."""
    from sdb_core.onnx_torch import onnx_classifier
    from tests.onnx_graphs import onnx_bytes

    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 1, (60, 32)), rng.normal(1e4, 50, (60, 32)), rng.integers(0, 5, (60, 32))], 1)
    y = np.arange(60) % 3
    as_images = load_dataset(f"npz:{write(tmp_path / 'i.npz', x=(x - x.min()) / (x.max() - x.min()), y=y)}")
    assert as_images.in_shape == (1, 3, 32)
    data = load_dataset(f"npz:{write(tmp_path / 's.npz', x=x, y=y, layout=np.array('signals'))}")
    assert data.in_shape == (3, 32) and len(data.mean) == 3 and data.mean[1] == pytest.approx(1e4, rel=1e-2)
    xt = data.train.tensors[0]
    assert torch.allclose(xt.mean((0, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(xt.std((0, 2), correction=0), torch.ones(3), atol=1e-3)
    assert describe_npz(tmp_path / "s.npz")["layout"] == "signals"
    one = load_dataset(f"npz:{write(tmp_path / 'one.npz', x=x[:, 1], y=y, layout=np.array('signals'))}")
    assert one.in_shape == (1, 32)

    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 5), torch.nn.AdaptiveAvgPool1d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 3))
    net = onnx_classifier(onnx_bytes(conv, data.in_shape), data.in_shape)
    assert net(xt[:5]).shape == (5, 3)
    with pytest.raises(DatasetError, match="image_size resizes images; x holds signals"):
        load_dataset(f"npz:{tmp_path / 's.npz'}", image_size=32)
