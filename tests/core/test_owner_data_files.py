"""An owner's data files as they come from elsewhere (Kaggle's layout, a grayscale GIF, a .jfif, a linked folder,
keras.datasets' labels), read locally the way the upload check and the SDK's folder upload read them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdb_core.data import DatasetError, load_dataset

SHADES = {"cats": 40, "dogs": 200}


def write_images(folder: Path, shade: int, n: int = 5, suffix: str = ".png", fmt: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (10, 10), (shade, 255 - shade, i)).save(folder / f"{i}{suffix}", fmt)


def test_kaggle_split_folders_are_refused_naming_the_folder_to_give_not_read_as_two_classes(tmp_path):
    """training_set/training_set/{cats,dogs} beside test_set/test_set/{cats,dogs} loaded as the classes
    ['test_set', 'training_set'], every cat and dog of a split one class, and a wrap shipped a box of those labels."""
    for split, n in (("training_set", 5), ("test_set", 2)):
        for cls, shade in SHADES.items():
            write_images(tmp_path / split / split / cls, shade, n)
    with pytest.raises(DatasetError) as err:
        load_dataset(f"imagefolder:{tmp_path}")
    message = str(err.value)
    for words in ("class folder test_set/ holds no images of its own", "test_set/test_set/cats/",
                  "folder of classes or a split", "(test_set/test_set/)", "train/<class>/<images>"):
        assert words in message, message
    # the folder the message names is one to give
    data = load_dataset(f"imagefolder:{tmp_path / 'training_set' / 'training_set'}")
    assert data.labels == ["cats", "dogs"]


def test_class_folders_that_keep_their_images_in_one_sub_folder_or_beside_some_are_still_read(tmp_path):
    write_images(tmp_path / "cats" / "images", SHADES["cats"])  # one sub-folder: the class's images
    write_images(tmp_path / "dogs", SHADES["dogs"], 3)  # its own images and more in two sub-folders
    write_images(tmp_path / "dogs" / "indoor", SHADES["dogs"], 3)
    write_images(tmp_path / "dogs" / "outdoor", SHADES["dogs"], 3)
    write_images(tmp_path / "cats" / ".thumbnails", SHADES["dogs"], 3)  # skipped: not a second folder of cats
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.labels == ["cats", "dogs"] and len(data.train) + len(data.test) == 14


def test_a_grayscale_gif_is_read_as_one_channel_and_a_coloured_palette_as_three(tmp_path):
    """A GIF (a palette image) never counted as grayscale: a 1-channel teacher then failed on 3-channel data."""
    for cls, shade in SHADES.items():
        (tmp_path / "gray" / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (10, 10), shade + i).save(tmp_path / "gray" / cls / f"{i}.gif")
    assert Image.open(tmp_path / "gray" / "cats" / "0.gif").mode == "P"  # Pillow reads it as a palette
    data = load_dataset(f"imagefolder:{tmp_path / 'gray'}", image_size=8)
    assert data.in_shape == (1, 8, 8)
    for cls, shade in SHADES.items():
        write_images(tmp_path / "colour" / cls, shade, suffix=".gif")
    assert load_dataset(f"imagefolder:{tmp_path / 'colour'}", image_size=8).in_shape == (3, 8, 8)


def test_jfif_files_are_read_as_the_jpegs_they_are(tmp_path):
    """A .jfif (a JPEG as Windows and browsers save some) was skipped silently: its class 'had no images'."""
    write_images(tmp_path / "cats", SHADES["cats"], suffix=".jfif", fmt="JPEG")
    write_images(tmp_path / "dogs", SHADES["dogs"], suffix=".jpg")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.labels == ["cats", "dogs"] and len(data.train) + len(data.test) == 10


def test_a_linked_folder_inside_a_class_is_read_as_the_sdk_uploads_it(tmp_path):
    """The loader's rglob skipped a linked sub-folder the SDK's folder upload followed: one folder, two data sets.
    A link back to a folder it lies in is refused, as the SDK refuses it."""
    from sdb_client._base import folder_files

    from sdb_core.data.imagefolder import _scan

    root = tmp_path / "set"
    write_images(root / "cats", SHADES["cats"])
    write_images(root / "dogs", SHADES["dogs"])
    write_images(tmp_path / "elsewhere", SHADES["dogs"], 4)
    (root / "dogs" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    files, targets, classes = _scan(root, None)
    assert {c: targets.count(i) for i, c in enumerate(classes)} == {"cats": 5, "dogs": 9}
    assert sorted(files) == folder_files(root)  # the very files the SDK's upload of the folder sends
    (root / "cats" / "up").symlink_to(root, target_is_directory=True)
    with pytest.raises(DatasetError, match="links back to a folder it lies in"):
        load_dataset(f"imagefolder:{root}")


def test_npz_labels_of_shape_n_by_1_are_read_as_keras_datasets_gives_them(tmp_path):
    """keras.datasets (cifar10.load_data()) gives y as (N, 1): it was refused ("expected (N,)")."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8), (np.arange(30) % 3).reshape(-1, 1)
    np.savez(tmp_path / "k.npz", x=x, y=y, x_test=x[:6], y_test=y[:6])
    data = load_dataset(f"npz:{tmp_path / 'k.npz'}")
    assert data.num_classes == 3 and data.train.tensors[1].tolist() == y.ravel().tolist()
    assert data.test.tensors[1].shape == (6,)
    np.savez(tmp_path / "split.npz", x=x, y=y)  # the 80/20 split drawn from (N, 1) labels too
    assert len(load_dataset(f"npz:{tmp_path / 'split.npz'}").test) == 6
    np.savez(tmp_path / "wide.npz", x=x, y=np.zeros((30, 2), int))  # two labels a sample: still refused
    with pytest.raises(DatasetError, match=r"expected \(30,\) or \(30, 1\)"):
        load_dataset(f"npz:{tmp_path / 'wide.npz'}")
