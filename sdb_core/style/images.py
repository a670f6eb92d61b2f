"""Images for style transfer: the embedded photographs and textures, uploads, PNG out, and
training sets of content crops.

Embedded (no download): scikit-image's ``skimage.data`` photographs and textures and
scikit-learn's ``load_sample_images`` (china, flower). An image is named by one of those
names or is a path to a PNG/JPEG file. Tensors are (3, H, W) float32 RGB in [0, 1].
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from ..data.imagefolder import _images_in, open_image
from ..pixels import open_checked, unit_pixels, upright_size
from .config import _SKLEARN, CONTENT_IMAGES, EMBEDDED, STYLE_IMAGES  # noqa: F401 (re-exported)

MAX_PIXELS = 40_000_000  # a decoded image larger than this is refused (decompression bombs)


def _embedded_array(name: str) -> np.ndarray:
    if name in _SKLEARN:
        # load_sample_images reads both JPEGs; only the asked one is kept.
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        return next(im for f, im in zip(bunch.filenames, bunch.images) if Path(f).stem == name)
    import skimage.data

    return getattr(skimage.data, name)()


def _to_tensor(arr: np.ndarray) -> Tensor:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB or grayscale image, got an array of shape {arr.shape}")
    arr = arr[..., :3]
    scale = 255.0 if arr.dtype == np.uint8 else (65535.0 if arr.dtype == np.uint16 else 1.0)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / scale).permute(2, 0, 1).clamp(0, 1)


def decode_image(data: bytes) -> Tensor:
    """PNG/JPEG bytes → (3, H, W); ValueError for anything that is not a readable image, or one built to cost far
    more to decode than its size (:func:`~sdb_core.pixels.open_checked`)."""
    try:
        with open_checked(data) as im:
            if im.format not in ("PNG", "JPEG"):
                raise ValueError(f"image format {im.format} is not PNG or JPEG")
            return _read_pixels(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable PNG or JPEG image ({e})") from None


def _read_pixels(im: Image.Image, max_side: int | None = None) -> Tensor:
    """``im`` upright as (3, H, W) in [0, 1], shrunk so its longer side is at most ``max_side``: read by
    :func:`~sdb_core.pixels.unit_pixels`, so a 16-bit image spans its depth (``convert("RGB")`` clips it at 255)."""
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"image of {im.width}x{im.height} pixels is too large")
    w, h = upright_size(im)
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    return _to_tensor(unit_pixels(im, "RGB", (w, h)))


def _load_folder_image(path: Path, max_side: int) -> Tensor:
    """An ImageFolder image, in any format the ImageFolder reader takes (:data:`IMAGE_FORMATS`, not only the
    PNG/JPEG of an uploaded ``image``), shrunk to ``max_side``; ValueError when it cannot be read."""
    try:
        with open_image(path) as im:
            return _read_pixels(im, max_side)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path} ({e})") from None


def load_image(source: str | os.PathLike) -> Tensor:
    """An embedded image by name, or a PNG/JPEG file by path, as (3, H, W) in [0, 1]."""
    s = str(source)
    if s in EMBEDDED:
        return _to_tensor(_embedded_array(s))
    p = Path(s).expanduser()
    if not p.is_file():
        raise ValueError(f"no image {s!r}: not an embedded name ({', '.join(EMBEDDED)}) and no such file")
    return decode_image(p.read_bytes())


def fit_square(img: Tensor, size: int) -> Tensor:
    """Resize the shorter side to ``size`` and crop the centre square: (3, size, size)."""
    out = shorter_side(img, size)
    _, h, w = out.shape
    top, left = (h - size) // 2, (w - size) // 2
    return out[:, top:top + size, left:left + size].contiguous()


def shorter_side(img: Tensor, side: int) -> Tensor:
    """Resize so the shorter side is ``side`` (aspect kept)."""
    _, h, w = img.shape
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def to_pil(img: Tensor) -> Image.Image:
    arr = (img.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def png_bytes(img: Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: Tensor, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(png_bytes(img))
    return p


def sheet(images: Sequence[Tensor], titles: Sequence[str], height: int = 256) -> Image.Image:
    """Images side by side at one height, a title over each: the before/after sheet."""
    tiles = []
    for img in images:
        _, h, w = img.shape
        tiles.append(to_pil(img).resize((max(1, round(w * height / h)), height), Image.Resampling.BILINEAR))
    band = 18
    out = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), height + band), "white")
    draw = ImageDraw.Draw(out)
    x = 0
    for t, title in zip(tiles, titles):
        out.paste(t, (x, band))
        draw.text((x + 4, 3), title, fill="black")
        x += t.width + 4
    return out


class ContentCrops(Dataset):
    """``length`` random crops of ``crop``×``crop`` from a few images: flips and colour jitter.

    Each source is resized once so that its shorter side is ``scale``×``crop``; every item is
    a fresh crop drawn with torch's global generator (seeded by the training loop), so an
    epoch sees new crops and a run is reproducible. Items are ``(x,)`` tuples for ``fit``.
    """

    def __init__(self, images: Sequence[Tensor], crop: int, length: int, *, scale: float = 1.6,
                 jitter: float = 0.15, shuffle_channels: bool = False):
        if not images:
            raise ValueError("no images to crop from")
        if crop < 8 or length < 1:
            raise ValueError(f"crop must be >= 8 and length >= 1, got crop={crop}, length={length}")
        side = max(crop, round(crop * scale))
        self.images = [shorter_side(img, side) for img in images]
        self.crop, self.length, self.jitter, self.shuffle_channels = crop, length, jitter, shuffle_channels

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor]:
        img = self.images[int(torch.randint(len(self.images), ()))]
        _, h, w = img.shape
        top = int(torch.randint(h - self.crop + 1, ()))
        left = int(torch.randint(w - self.crop + 1, ()))
        x = img[:, top:top + self.crop, left:left + self.crop]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.jitter > 0:
            b, c, s = (1.0 + self.jitter * (2 * torch.rand(3) - 1)).tolist()
            x = x * b
            x = (x - x.mean()) * c + x.mean()
            gray = x.mean(0, keepdim=True)
            x = (x - gray) * s + gray
        if self.shuffle_channels:
            x = x[torch.randperm(3)]
        return (x.clamp(0, 1).contiguous(),)


def content_images(source: str = "embedded", max_images: int = 200) -> list[Tensor]:
    """The images content crops are cut from: ``embedded`` (CONTENT_IMAGES), a comma-separated
    list of embedded names or files, or ``imagefolder:PATH`` (every image under PATH)."""
    if source == "embedded":
        return [load_image(n) for n in CONTENT_IMAGES]
    kind, sep, path = source.partition(":")
    if kind == "imagefolder" and sep:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist or is not a directory")
        files = _images_in(root)[:max_images]
        if not files:
            raise ValueError(f"no images under {root}")
        # Shrunk on load: crops are small, and a folder of photographs would not fit in memory.
        return [_load_folder_image(f, 512) for f in files]
    return [load_image(s.strip()) for s in source.split(",") if s.strip()]
