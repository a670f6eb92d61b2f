"""Images as their viewers show them, and refused before decoding when built to cost far more than their size
(sdb_core.pixels): the one reading of served images, style transfer and image-folder training data.

- A progressive JPEG of one tiny scan repeated costs a pass over every block a scan (a 4000x4000 one of 10,000
  scans, 373 KB: 8-12 s of CPU); a PNG of 583,000 empty chunks, a JPEG of 1.75 M empty comments, seconds of
  Python holding the GIL. The walk refuses them in milliseconds; real files pass it.
- What is transparent is laid over white (a digit drawn in black on a transparent canvas was a uniform input).
- Orientation is EXIF's alone: an XMP ``tiff:Orientation`` (which Pillow falls back to, browsers ignore) is not
  applied.
"""
from __future__ import annotations

import io
import pathlib
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw
from PIL.PngImagePlugin import PngInfo

from sdb_core.data.imagefolder import _read, open_image
from sdb_core.pixels import (
    MAX_IDAT_CHUNKS,
    MAX_JPEG_SCANS,
    MAX_SEGMENTS,
    CostlyImage,
    image_layout,
    open_checked,
    unit_pixels,
    upright,
    upright_size,
)
from sdb_core.style.images import decode_image

FAST_S = 1.0  # a refusal's bound on a loaded 2-core machine: the old decoding took seconds on each of these


# ----------------------------------------------------------------------------- costly files, built here
def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's (marker, bytes) from SOI to EOI, each scan with its entropy-coded data."""
    out, i = [(0xD8, data[:2])], 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            return [*out, (marker, data[i:i + 2])]
        end = i + 2 + struct.unpack_from(">H", data, i + 2)[0]
        if marker == 0xDA:  # the scan's data runs to the next marker that is no stuffed 0xFF00 or restart
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
        out.append((marker, data[i:end]))
        i = end
    raise AssertionError("no EOI")


def scan_bomb(side: int, scans: int) -> bytes:
    """A ``side``² grey progressive JPEG whose second scan (a few bytes: the first AC band of a flat picture) is
    repeated until the file holds ``scans`` scans."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    segments = _jpeg_segments(buf.getvalue())
    at = [n for n, (m, _) in enumerate(segments) if m == 0xDA][1]
    repeats = scans - sum(m == 0xDA for m, _ in segments)
    return b"".join(s for _, s in segments[:at + 1]) + segments[at][1] * repeats + \
        b"".join(s for _, s in segments[at + 1:])


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_chunks(n: int, kind: bytes = b"quRK") -> bytes:
    """A 64x64 PNG with ``n`` empty chunks of ``kind`` before its pixels (``IDAT``: its pixel data split so)."""
    buf = io.BytesIO()
    Image.new("L", (64, 64)).save(buf, "PNG")
    data = buf.getvalue()
    at = data.index(b"IDAT") - 4
    return data[:at] + _chunk(kind) * n + data[at:]


def jpeg_of_comments(n: int) -> bytes:
    """A 64x64 JPEG with ``n`` empty comments (COM markers) before its first scan."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + b"\xff\xfe\x00\x02" * n + data[2:]


def _refused_fast(data: bytes, words: str) -> None:
    start = time.perf_counter()
    with pytest.raises(CostlyImage, match=words):
        open_checked(data)
    assert time.perf_counter() - start < FAST_S


def test_a_jpeg_of_more_scans_than_any_encoder_writes_is_refused_before_decoding():
    _refused_fast(scan_bomb(4000, 1000), f"more than {MAX_JPEG_SCANS} scans")
    # the bound is far above what encoders write, and a file at it is read
    at_bound = scan_bomb(64, MAX_JPEG_SCANS)
    with open_checked(at_bound) as im:
        im.load()
    assert image_layout(at_bound).width == 64


def test_files_of_many_chunks_or_markers_are_refused_before_pillow_reads_them():
    _refused_fast(png_of_chunks(583_000), f"more than {MAX_SEGMENTS} chunks")
    _refused_fast(png_of_chunks(MAX_IDAT_CHUNKS + 1, b"IDAT"), "pixel data is split")
    _refused_fast(jpeg_of_comments(1_750_000), f"more than {MAX_SEGMENTS} markers")
    plain = jpeg_of_comments(0)
    app0_end = 4 + struct.unpack_from(">H", plain, 4)[0]
    _refused_fast(plain[:app0_end] + b"\x00" * 100_000 + plain[app0_end:], "stray bytes")
    for data in (png_of_chunks(MAX_SEGMENTS - 10), png_of_chunks(1000, b"IDAT"), jpeg_of_comments(MAX_SEGMENTS - 10)):
        with open_checked(data) as im:
            im.load()


def _photo(size=(640, 480)) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    arr = np.stack([xx % 256, yy % 256, rng.integers(0, 256, (size[1], size[0]))], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _real_files() -> dict[str, bytes]:
    """What encoders write: Pillow's progressive JPEGs (libjpeg-turbo's scan script, optimised tables), PNGs with
    an ICC profile, gamma and text chunks, the console's samples and the photos scikit-learn and scikit-image ship."""
    files, photo = {}, _photo()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    for name, im, kw in (("progressive", photo, {"progressive": True, "optimize": True}),
                         ("progressive-grey", photo.convert("L"), {"progressive": True, "optimize": True}),
                         ("progressive-cmyk", photo.convert("CMYK"), {"progressive": True}),
                         ("baseline-icc-exif", photo, {"quality": 95, "icc_profile": icc, "exif": exif.tobytes()}),
                         ("restart-intervals", photo, {"restart_marker_blocks": 1})):
        buf = io.BytesIO()
        im.save(buf, "JPEG", **kw)
        files[f"{name}.jpg"] = buf.getvalue()
    info = PngInfo()
    info.add(b"gAMA", struct.pack(">I", 45455))
    for n in range(20):
        info.add_text(f"key{n}", "value " * 50, zip=n % 2 == 1)
    info.add_itxt("Description", "a photo", lang="en")
    buf = io.BytesIO()
    photo.convert("RGBA").save(buf, "PNG", pnginfo=info, icc_profile=icc, exif=exif.tobytes())
    files["metadata.png"] = buf.getvalue()
    import skimage
    import sklearn.datasets

    shipped = [*(pathlib.Path(__file__).parents[2] / "service/console/static/samples").glob("*.png"),
               *(pathlib.Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"),
               *(pathlib.Path(skimage.__file__).parent / "data").glob("*.[pj][np]g")]
    files.update({p.name: p.read_bytes() for p in shipped})
    return files


def test_real_files_pass_the_walk_and_read_as_before():
    files = _real_files()
    assert len(files) > 40
    for name, data in files.items():
        layout = image_layout(data)
        with Image.open(io.BytesIO(data)) as plain, open_checked(data) as im:
            assert (layout.format, layout.width, layout.height) == (plain.format, *plain.size), name
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(plain.convert("RGB"))), name
    assert image_layout(b"GIF89a....") is None  # not a PNG or JPEG: Pillow decides what it is


# ----------------------------------------------------------------------------- transparency over white
def _ink() -> np.ndarray:
    """Where a ring is drawn on a 32x32 canvas."""
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).ellipse([6, 4, 26, 28], outline=255, width=4)
    return np.asarray(mask) > 0


def _canvases() -> dict[str, Image.Image]:
    """A black ring on a transparent canvas in each way PNGs (and Pillow) hold transparency."""
    ink = _ink()
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[ink] = (0, 0, 0, 255)
    la = np.zeros((32, 32, 2), np.uint8)
    la[ink] = (0, 255)
    palette = Image.fromarray(ink.astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 0, 0])
    palette.info["transparency"] = 0  # entry 0, black as the ink, is transparent
    keyed = Image.fromarray(np.where(ink, 0, 200).astype(np.uint8), "L")
    keyed.info["transparency"] = 200
    deep = Image.fromarray(np.where(ink, 0, 1234).astype(np.uint16))
    deep.info["transparency"] = 1234
    pa = palette.convert("PA")
    return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(la, "LA"), "P": palette, "PA": pa,
            "L-keyed": keyed, "I;16-keyed": deep}


def _as_file(im: Image.Image) -> Image.Image:
    """``im`` through a PNG, as an upload holds it (PA is no PNG mode: kept as is)."""
    if im.mode == "PA":
        return im
    buf = io.BytesIO()
    im.save(buf, "PNG", **({"transparency": im.info["transparency"]} if "transparency" in im.info else {}))
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "PA", "L-keyed", "I;16-keyed"])
def test_a_drawing_on_a_transparent_canvas_reads_as_shown_on_white(kind):
    im = _as_file(_canvases()[kind])
    assert im.mode in ("RGBA", "LA", "P", "PA", "L", "I;16")
    want = np.where(_ink(), 0.0, 1.0)
    np.testing.assert_allclose(unit_pixels(im, "L", (32, 32)), want, atol=1e-6)
    np.testing.assert_allclose(unit_pixels(im, "RGB", (32, 32)), np.repeat(want[..., None], 3, 2), atol=1e-6)


def test_half_transparent_ink_is_grey_and_opaque_pixels_are_untouched():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 128  # black at half opacity over white
    rgba[0] = (10, 200, 30, 255)  # opaque: as they are
    got = unit_pixels(Image.fromarray(rgba, "RGBA"), "RGB", (4, 4)) * 255
    np.testing.assert_allclose(got[1:], 127, atol=1)
    np.testing.assert_allclose(got[0], np.tile([10, 200, 30], (4, 1)), atol=0)


def test_image_folders_and_style_read_transparent_images_over_white(tmp_path):
    canvas = _canvases()["RGBA"]
    canvas.save(tmp_path / "canvas.png")
    Image.alpha_composite(Image.new("RGBA", (32, 32), "white"), canvas).convert("RGB").save(tmp_path / "shown.png")
    out, _ = _read([tmp_path / "canvas.png", tmp_path / "shown.png"], 32)
    np.testing.assert_array_equal(out[0], out[1])
    assert out[0].min() == 0 and out[0].max() == 1
    np.testing.assert_array_equal(decode_image((tmp_path / "canvas.png").read_bytes()).numpy(), out[1])


def test_an_image_folder_refuses_a_costly_file_with_its_reason(tmp_path):
    (tmp_path / "bomb.jpg").write_bytes(scan_bomb(64, MAX_JPEG_SCANS + 1))
    with pytest.raises(ValueError, match="scans"):
        open_image(tmp_path / "bomb.jpg")


# ----------------------------------------------------------------------------- orientation: EXIF only
_XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def _with_xmp(fmt: str) -> dict:
    """Pillow's save arguments that write :data:`_XMP` (a JPEG's APP1 XMP segment, a PNG's iTXt chunk)."""
    if fmt == "JPEG":
        return {"xmp": _XMP, "quality": 100}
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _XMP.decode())
    return {"pnginfo": info}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_orientation_in_xmp_alone_is_not_applied(fmt):
    """Browsers show such an image as stored; Pillow's getexif() falls back to XMP's tiff:Orientation."""
    stored = Image.new("L", (48, 32))
    ImageDraw.Draw(stored).rectangle([0, 0, 15, 7], fill=255)
    buf = io.BytesIO()
    stored.save(buf, fmt, **_with_xmp(fmt))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        im.load()
        assert "exif" not in im.info and im.getexif().get(0x0112) == 6  # what the old reading applied
        assert upright(im) is im and upright_size(im) == (48, 32)
        assert unit_pixels(im, "L").shape == (32, 48)
    assert decode_image(buf.getvalue()).shape == (3, 32, 48)


def test_an_exif_orientation_is_applied_once_whatever_reads_it():
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("L", (48, 32)).save(buf, "PNG", exif=exif.tobytes(), **_with_xmp("PNG"))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        turned = upright(im)
        assert turned.size == upright_size(im) == (32, 48)
        assert upright(turned).size == (32, 48)  # no second turn
        assert unit_pixels(im, "L").shape == (48, 32)


def test_a_long_animation_is_a_png_like_any_other():
    """An APNG's frames (fcTL, fdAT) are pixel data, not metadata: a 2,100-frame animation, a real file, was refused
    as one of "extra metadata" past 4,096 chunks. Pillow reads its first frame."""
    frames = [Image.new("L", (8, 8), i % 256) for i in range(2100)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    assert image_layout(buf.getvalue()).format == "PNG"
    with open_checked(buf.getvalue()) as im:
        assert im.size == (8, 8)
