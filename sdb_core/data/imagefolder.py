"""``imagefolder:PATH``: one sub-folder per class, images inside (searched recursively, through linked folders).

If PATH holds ``train/`` and ``test/`` (or ``val/``, ``valid/``, ``validation/``; ``training/``, ``testing/``; in
any case: ``Train/``) those are the splits, and the classes are the train folder's; a ``train/`` alone holds the
classes; otherwise the class folders are PATH's own. Without a test folder a fixed stratified 80/20 split (seed 0) is
drawn. Images are read with Pillow, in the formats their extensions name only (an EPS named ``x.png`` is not run
through Ghostscript), resized to a square of ``image_size`` (default 32) and kept grayscale only if every image is
grayscale, else converted to RGB. Hidden files and folders (a name starting with ``.``) and archivers' and file
servers' leftovers (``__MACOSX/``, ``@eaDir/``) are skipped at any depth (:func:`skipped`: the upload check's rule
too). Class names are the folders' names in Unicode NFC (macOS writes them decomposed, NFD): ``train/café`` and
``test/café`` are one class whichever form each was written in. A class folder that holds no image of its own and
keeps its images in two or more sub-folders (Kaggle's ``training_set/training_set/{cats,dogs}``) is a folder of
classes or a split, not a class: refused (:func:`class_images`: the upload check's rule too), not read as one class.
Symbolic links to folders are followed at any depth (the SDK's folder upload sends what they hold: one rule for both);
a link back to a folder it lies in is refused.
"""
from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdb_core.class_names import name_problem
from sdb_core.data.base import DatasetError, DataSplits, make_splits, register_dataset, stratified_split
from sdb_core.pixels import open_checked, unit_pixels

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm"})  # .jfif: a JPEG as Windows and browsers save some
# What Pillow may read them as: the formats of those extensions (it picks a file's format by its content, and some it
# knows, EPS, hand the file to an outside program)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # JPEG opens MPO (a phone camera's JPEG) too
TRAIN_NAMES = ("train", "training")
TEST_NAMES = ("test", "val", "valid", "validation", "testing")
_GRAY_BANDS = {("L",), ("L", "A"), ("1",), ("I",), ("F",)}
_PALETTE_MODES = ("P", "PA")
_SPLIT_SEED = 0
DEFAULT_SIZE = 32
# What archivers and file servers add beside a tree (macOS resource forks, Synology's thumbnails): skipped like dot-files
JUNK_NAMES = frozenset({"__MACOSX", "@eaDir"})


def skipped(path: str | PurePath) -> bool:
    """Whether a path (relative to the tree: a zip member's name, a file under a class folder) is a hidden file, lies
    under a hidden folder or is an archiver's leftover: neither a class nor an image. The one rule the loader and the
    upload check (``service.filechecks``) share."""
    return any(p.startswith(".") or p in JUNK_NAMES for p in PurePosixPath(path).parts)


def class_name(folder: Path) -> str:
    """A class folder's class name: its name in Unicode NFC."""
    return unicodedata.normalize("NFC", folder.name)


def split_dirs(path: Path) -> tuple[Path, Path | None] | None:
    """The train split's folder and the test split's (None: none, an 80/20 split is drawn from train) when ``path``
    holds them, named in any case; None when its class folders are its own."""
    dirs = {p.name.lower(): p for p in path.iterdir() if p.is_dir() and not skipped(p.name)}
    train = next((dirs[n] for n in TRAIN_NAMES if n in dirs), None)
    test = next((dirs[n] for n in TEST_NAMES if n in dirs), None)
    if train is None or (test is None and len(dirs) > 1):  # "train" beside other folders: a class of that name
        return None
    return train, test


def open_image(path: Path) -> Image.Image:
    """``path`` opened in one of :data:`IMAGE_FORMATS`, a PNG or JPEG once its walk passed it
    (:func:`~sdb_core.pixels.open_checked`: ValueError for one built to cost far more to decode than its size)."""
    return open_checked(path.read_bytes(), IMAGE_FORMATS)


def _class_dirs(folder: Path) -> list[Path]:
    """The class folders, in the order of their class names (NFC: the order an upload, unpacked in NFC, has too)."""
    dirs = (p for p in folder.iterdir() if p.is_dir() and not skipped(p.name))
    return sorted(dirs, key=lambda p: (class_name(p), p.name))


def _files_under(folder: Path) -> Iterator[Path]:
    """The files under ``folder`` but the skipped ones, through linked folders too (the SDK's folder upload,
    ``sdb_client._base.folder_files``, sends what they hold); a link back to a folder it lies in is refused."""
    for d, dirs, files in os.walk(folder, followlinks=True):
        here = Path(d)
        real = os.path.realpath(here)
        if any(os.path.realpath(folder / above) == real for above in here.relative_to(folder).parents):
            raise DatasetError(f"{here} links back to a folder it lies in: remove the link")
        dirs[:] = sorted(n for n in dirs if not skipped(n))
        yield from (here / f for f in files if not skipped(f))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in _files_under(folder) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def class_images(folder: Path, root: Path) -> list[Path]:
    """A class folder's images, at any depth; DatasetError (naming folders relative to ``root``, the tree's) when it
    holds none of its own and keeps them in two or more folders: a folder of class folders, or a split (Kaggle's
    ``training_set/training_set/{cats,dogs}``), that would otherwise be read as one class of them all."""
    found = _images_in(folder)
    holders = sorted({p.parent for p in found})
    if len(holders) >= 2 and folder not in holders:
        def shown(p: Path | str) -> str:
            return Path(p).relative_to(root).as_posix()

        listed = ", ".join(f"{shown(h)}/" for h in holders[:4]) + (", ..." if len(holders) > 4 else "")
        raise DatasetError(
            f"class folder {shown(folder)}/ holds no images of its own, and its images lie in {len(holders)} folders "
            f"({listed}): it looks like a folder of classes or a split, not one class. Give the folder whose "
            f"sub-folders are the classes ({shown(os.path.commonpath(holders))}/), laid out as <class>/<images>, or "
            "as train/<class>/<images> and test/<class>/<images> for a split of your own")
    return found


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """Files and label indices of one split; ``classes`` fixes the label order (a test split's)."""
    dirs = _class_dirs(folder)
    if not dirs:
        raise DatasetError(f"no class folders in {folder}: expected {folder}/<class_name>/<image files>")
    names = list(dict.fromkeys(class_name(d) for d in dirs))  # two folders of one name in NFC: one class, as unpacked
    if classes is None:
        if len(names) < 2:
            raise DatasetError(f"{folder} has {len(names)} class folder ({names[0]!r}); a classifier needs at least 2")
        if (problem := name_problem(names)) is not None:
            raise DatasetError(f"{folder}: its class folders name the classes, and {problem}")
        classes = names
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DatasetError(f"{folder} has classes that are not in the train split: {unknown}")
    files, targets = [], []
    for d in dirs:
        try:
            found = class_images(d, folder)
        except DatasetError as e:
            raise DatasetError(f"{folder}: {e}") from None
        if not found:
            raise DatasetError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += found
        targets += [classes.index(class_name(d))] * len(found)
    return files, targets, classes


def _is_gray(im: Image.Image) -> bool:
    """Whether an image holds gray values only: a gray mode, or a palette (a GIF's, an 8-bit PNG's) whose every entry
    is gray (Pillow reads a grayscale GIF as a palette image)."""
    if im.mode in _PALETTE_MODES:
        entries = np.asarray(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        return bool((entries == entries[:, :1]).all())
    return im.getbands() in _GRAY_BANDS


def _read(files: list[Path], size: int) -> tuple[np.ndarray, bool]:
    """(N, 3, size, size) floats in [0, 1], and whether every image was grayscale."""
    out = np.empty((len(files), 3, size, size), dtype=np.float32)
    all_gray = True
    for i, f in enumerate(files):
        try:
            with open_image(f) as im:
                all_gray &= _is_gray(im)
                rgb = unit_pixels(im, "RGB", (size, size))  # a 16-bit image over its depth, not clipped
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {f}: {e}") from e
        out[i] = rgb.transpose(2, 0, 1)
    return out, all_gray


@register_dataset
def imagefolder(path: Path | None, *, image_size: int | None = None, seed: int = 0) -> DataSplits:
    if path is None:
        raise DatasetError("imagefolder needs a path: 'imagefolder:PATH'")
    if not path.is_dir():
        raise DatasetError(f"image folder {path} does not exist or is not a directory")
    size = image_size or DEFAULT_SIZE
    splits = split_dirs(path)
    if splits is not None and splits[1] is not None:
        train_files, y_train, classes = _scan(splits[0], None)
        test_files, y_test, _ = _scan(splits[1], classes)
    else:
        files, y, classes = _scan(path if splits is None else splits[0], None)
        tr, te = stratified_split(np.asarray(y), round(0.2 * len(files)), _SPLIT_SEED)
        if len(te) == 0:
            raise DatasetError(
                f"{path} has too few images ({len(files)}) to hold out a test split; "
                "add images or provide train/ and test/ folders"
            )
        train_files, y_train = [files[i] for i in tr], [y[i] for i in tr]
        test_files, y_test = [files[i] for i in te], [y[i] for i in te]
    x_train, gray_train = _read(train_files, size)
    x_test, gray_test = _read(test_files, size)
    if gray_train and gray_test:
        # Grayscale converted to RGB repeats one channel, so channel 0 is the image exactly.
        x_train, x_test = x_train[:, :1], x_test[:, :1]
    return make_splits(f"imagefolder:{path}", x_train, y_train, x_test, y_test, classes)
