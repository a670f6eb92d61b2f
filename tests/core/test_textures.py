"""``mnist-textures``: CIFAR's shape, mnist-5k's fixed split and labels, colour, offline, learnable."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from sdb_core.data import DatasetError, DataSplits, list_datasets, load_dataset
from sdb_core.data import textures as tex


def raw_pixels(data: DataSplits, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to the [0, 1] pixel scale."""
    return x * torch.tensor(data.std).view(-1, 1, 1) + torch.tensor(data.mean).view(-1, 1, 1)


@pytest.fixture(scope="module")
def textures() -> DataSplits:
    return load_dataset("mnist-textures")


@pytest.fixture(scope="module")
def mnist() -> DataSplits:
    return load_dataset("mnist-5k")


def test_cifar_shape_and_the_mnist_split(textures):
    assert "mnist-textures" in list_datasets()
    xtr, ytr = textures.train.tensors
    xte, yte = textures.test.tensors
    assert xtr.shape == (4000, 3, 32, 32) and xte.shape == (1000, 3, 32, 32)
    assert textures.in_shape == (3, 32, 32) and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert textures.num_classes == 10 and textures.labels == [str(d) for d in range(10)]
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yte).tolist() == [100] * 10
    assert len(textures.mean) == 3 and abs(xtr.mean().item()) < 1e-4
    pixels = raw_pixels(textures, torch.cat([xtr, xte]))
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_splits_are_fixed_whatever_the_seed(textures):
    # Rebuilding from nothing (caches cleared) must draw the very same images.
    tex._textures_arrays.cache_clear()
    tex._background_pool.cache_clear()
    other = load_dataset("mnist-textures", seed=123)
    for a, b in ((textures.train, other.train), (textures.test, other.test)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    assert textures.mean == other.mean and textures.std == other.std


@pytest.mark.parametrize("split", ["train", "test"])
def test_each_image_is_its_mnist_digit_with_its_label(textures, mnist, split):
    """Image i of a split is mnist-5k's digit i of that split, painted over the split's background i."""
    digits = raw_pixels(mnist, getattr(mnist, split).tensors[0])[:, 0].numpy()
    x, y = getattr(textures, split).tensors
    assert torch.equal(y, getattr(mnist, split).tensors[1])
    drawn = tex._render(digits, split)
    np.testing.assert_allclose(drawn, raw_pixels(textures, x).numpy(), atol=1e-5)
    # The digit is really there: against the same backgrounds with no digit, every image has a
    # stroke's worth of pixels whose luminance moved by more than 0.2.
    blank = tex._render(np.zeros_like(digits), split)
    moved = np.abs(np.einsum("nchw,c->nhw", drawn - blank, tex._LUMA)) > 0.2
    assert moved.reshape(len(x), -1).sum(axis=1).min() >= 15
    # And it is that image's own digit: giving each image its neighbour's digit changes it.
    shifted = tex._render(np.roll(digits, 1, axis=0), split)
    assert (np.abs(shifted - drawn).reshape(len(x), -1).max(axis=1) > 0.2).mean() > 0.99


def test_no_test_digit_is_used_in_train(mnist):
    sources = tex._digit_sources()
    train, test = sources["train"], sources["test"]
    assert (len(train), len(test)) == (4000, 1000)
    assert not set(train.tolist()) & set(test.tolist())
    # The test sources are exactly mnist-5k's test digits, in order.
    x, _ = tex._mnist_5k_arrays()
    ours = x[test].reshape(-1, 28, 28).astype(np.uint8)
    theirs = (raw_pixels(mnist, mnist.test.tensors[0])[:, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(ours, theirs)


def test_images_are_in_colour(textures):
    x = raw_pixels(textures, textures.test.tensors[0])
    spread = (x.max(dim=1).values - x.min(dim=1).values).mean(dim=(1, 2))
    # Plain MNIST in three channels would have spread 0 everywhere; a few of ours are near-grey.
    assert (spread > 0.02).float().mean() > 0.9 and spread.median() > 0.04


def test_backgrounds_ship_with_scikit_image(monkeypatch):
    """Every source image is read from inside the installed package, with the network cut."""
    import skimage
    import skimage.data._fetchers as fetchers

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    # scikit-image skips, rather than fails, a pytest test that would need a download.
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    read = []
    fetch = fetchers._fetch

    def recording_fetch(name, *args, **kwargs):
        path = fetch(name, *args, **kwargs)
        read.append(Path(path).resolve())
        return path

    monkeypatch.setattr(fetchers, "_fetch", recording_fetch)
    tex._background_pool.cache_clear()
    try:
        pyramids, grey = tex._background_pool()
    finally:
        tex._background_pool.cache_clear()
    assert len(pyramids) == len(grey) == len(tex._COLOUR_SOURCES) + len(tex._GREY_SOURCES)
    package = Path(os.path.dirname(skimage.__file__)).resolve()
    assert len(read) == len(pyramids) and all(package in p.parents for p in read)


@pytest.mark.parametrize("name,root", [("mnist-textures:/tmp/anything", None), ("mnist-textures", "/tmp")])
def test_a_path_is_refused(name, root):
    with pytest.raises(DatasetError, match="takes no path"):
        load_dataset(name, root=root)


def test_image_size(textures):
    small = load_dataset("mnist-textures", image_size=16)
    assert small.in_shape == (3, 16, 16) and small.train.tensors[0].shape == (4000, 3, 16, 16)
    assert torch.equal(small.test.tensors[1], textures.test.tensors[1])


def test_a_small_cnn_learns_it(textures):
    from sdb_core.models import create_model
    from sdb_core.train import TrainConfig, accuracy, seed_everything, train_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_everything(0)
        model = create_model("cnn", num_classes=textures.num_classes, in_shape=textures.in_shape)
        # lr 0.05: at the default 0.01 the first epochs are a plateau; 8 epochs there give ~90%.
        train_classifier(model, textures.train, TrainConfig(epochs=2, lr=0.05, device="cpu"))
        assert accuracy(model, textures.test) > 50.0
    finally:
        torch.set_num_threads(threads)
