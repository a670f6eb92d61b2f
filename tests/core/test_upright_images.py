"""An image is read as viewers show it: turned by its EXIF orientation (sdb_core.pixels.upright), in training data
(image folders), served predictions and style transfer alike. A phone stores a portrait photo sideways with a tag
that browsers honour; read as stored, the model saw it on its side.

The stored pixels for each orientation are built here from what the EXIF specification says the tag means (which
way the stored image must be turned or mirrored to be shown), not from Pillow's own table."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdb_core.data.imagefolder import _read
from sdb_core.pixels import unit_pixels, upright
from sdb_core.style.images import decode_image

ORIENTATION = 0x0112
# orientation → the stored array of an upright one (numpy's rot90 turns counter-clockwise)
STORED = {1: lambda u: u,
          2: np.fliplr,                         # shown mirrored left to right
          3: lambda u: np.rot90(u, 2),          # shown turned half a turn
          4: np.flipud,                         # shown mirrored top to bottom
          6: lambda u: np.rot90(u, 1),          # shown turned a quarter clockwise (a phone held upright)
          8: lambda u: np.rot90(u, -1)}         # shown turned a quarter counter-clockwise


def _upright_gray() -> np.ndarray:
    """12 x 20, no symmetry: each turn or mirror of it differs."""
    u = np.zeros((12, 20), np.uint8)
    u[:4, :] = 255
    u[:, :3] = 128
    u[10, 15] = 60
    return u


def _file(stored: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_pixels_are_read_as_shown(orientation):
    u = _upright_gray()
    data = _file(STORED[orientation](u), orientation)
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif()[ORIENTATION] == orientation
        got = unit_pixels(im, "L", (20, 12))
    np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8), u)
    rgb = decode_image(data).numpy()  # style transfer's reading
    assert rgb.shape == (3, 12, 20)
    np.testing.assert_array_equal(np.round(rgb[0] * 255).astype(np.uint8), u)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_an_image_without_the_tag_is_itself_untouched():
    im = Image.fromarray(_upright_gray())
    assert upright(im) is im
    broken = Image.fromarray(_upright_gray())
    broken.info["exif"] = b"Exif\x00\x00MM\x00*garbage"
    assert np.array_equal(np.asarray(upright(broken)), _upright_gray())


def test_an_image_folder_reads_its_photos_upright(tmp_path):
    u = _upright_gray()
    (tmp_path / "turned.png").write_bytes(_file(STORED[6](u), 6))
    (tmp_path / "plain.png").write_bytes(_file(u, 1))
    out, _ = _read([tmp_path / "turned.png", tmp_path / "plain.png"], 16)
    np.testing.assert_array_equal(out[0], out[1])
