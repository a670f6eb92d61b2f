"""What an uploaded file must be before it is kept: one check per purpose, each a 422 naming the problem.

- ``weights``: a state dict of tensors that loads the safe way (``sdb_core.weights``: safetensors, or
  ``torch.load(weights_only=True)``; nothing is ever unpickled), or a network as ONNX that the jobs can run
  (standard operators the torch bridge has, one input, within the graph-size bound); told apart by content,
  not by name;
- ``dataset``: a zip of an ImageFolder tree (extracted here, member by member: no absolute paths, no
  ``..``, no links, under the member and size limits; every image's header read within the pixel
  limit) or an ``.npz`` of ``x`` and ``y`` (array headers only: no pickled objects);
- ``image``: a PNG or JPEG that decodes within the pixel limit the predict routes use;
- ``bundle``: an ``.sdb`` whose ``meta.json`` and file hashes verify.

Every check is blocking (call it in a worker thread) and writes the checked file or folder into
``out``, a folder the caller moves into place only when the check passed. torch is imported here
only inside the checks that need it, so importing the app stays torch-free.
"""
from __future__ import annotations

import json
import shutil
import stat
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sdb_core.class_names import name_problem
from sdb_core.pixels import CostlyImage, open_checked

from .errors import ApiError, no_room
from .tensors import IMAGE_FORMATS, MAX_IMAGE_PIXELS, image_format

PURPOSES = ("weights", "dataset", "image", "bundle")
_CHUNK = 1 << 20
_UTF8_NAMES = 0x800  # a zip member's flag bit 11: its name is UTF-8 (else cp437, by the format)


@dataclass(frozen=True)
class Limits:
    unpacked_bytes: int  # what an archive may unpack to
    members: int  # entries an archive may hold
    image_pixels: int = MAX_IMAGE_PIXELS


@dataclass
class Checked:
    format: str  # safetensors | pt | onnx | imagefolder | npz | png | jpeg | sdb
    stored: str  # the checked file or folder, relative to ``out``
    info: dict = field(default_factory=dict)  # what GET /v1/files shows of the content


def rejected(purpose: str, message: str) -> ApiError:
    return ApiError(422, f"invalid_{purpose}", message)


def check_upload(purpose: str, src: Path, out: Path, limits: Limits, filename: str = "upload") -> Checked:
    """Check ``src`` as ``purpose`` and write what is kept into ``out``; ApiError 422 otherwise.

    ``src`` may be moved. Messages name ``filename`` (the client's), never a server path."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _CHECKS[purpose](src, out, limits, filename)
    except ApiError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:  # anything the readers missed: still a clear 422
        # (a disk with no room to unpack into is the server's trouble, not the file's: 507)
        raise no_room(e, filename) or rejected(purpose, f"{filename}: cannot be read as {purpose} "
                                               f"({type(e).__name__})") from None


# ----------------------------------------------------------------------------- weights
def _is_safetensors(path: Path) -> bool:
    """The format's own framing: an 8-byte little-endian header length, then a JSON object."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= n <= size - 8


def _is_onnx(path: Path) -> bool:
    """An ONNX ModelProto opens with its ir_version (field 1, a varint: tag byte 0x08); torch.save's zip opens with
    PK, a pickle with 0x80 (a safetensors header, whose first byte is its length's, is told apart first)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x08"


def _check_onnx(src: Path, out: Path, filename: str) -> Checked:
    from sdb_core.graph_size import MAX_GRAPH_ENTRIES, STANDARD_DOMAINS, graph_entries, node_domains
    from sdb_core.onnx_qoperator import MS, standard_form

    dest = out / "weights.onnx"  # the name is how a job's model reference knows the file is a network
    shutil.move(src, dest)
    model = dest.read_bytes()
    if graph_entries(model) > MAX_GRAPH_ENTRIES:
        raise rejected("weights", f"{filename}: the ONNX graph holds more than {MAX_GRAPH_ENTRIES} nodes, "
                       "initializers and value infos")
    from google.protobuf.message import DecodeError

    from sdb_core.onnx_torch import OnnxModule  # torch: here only, in the caller's worker thread

    unreadable = rejected("weights", f"{filename}: neither weights (safetensors, a torch checkpoint) nor a readable "
                                     "ONNX model")
    info = {}
    foreign = node_domains(model) - STANDARD_DOMAINS
    if foreign == {MS}:  # ONNX Runtime's quantized operators (QOperator): kept as the standard graph they compute
        try:
            standard = standard_form(model)
        except ValueError as e:
            raise rejected("weights", f"{filename}: {_clip(str(e))}") from None
        except (DecodeError, KeyError, TypeError, RuntimeError):
            raise unreadable from None
        if standard is not None and graph_entries(standard) <= MAX_GRAPH_ENTRIES:  # (recorded: the upload's size, hash)
            model, foreign, info = standard, set(), {"quantized": "QOperator, stored as its QDQ form"}
            dest.write_bytes(model)
    if foreign:
        raise rejected("weights", f"{filename}: its graph uses operators of {', '.join(sorted(d[:60] for d in foreign)[:5])}; "
                       "an ONNX model a job runs may use the standard ONNX operators only")
    try:
        net = OnnxModule(model)  # read, not run (no fold): an upload's graph runs in a job's worker only
    except ValueError as e:
        raise rejected("weights", f"{filename}: {_clip(str(e))}") from None
    except (DecodeError, KeyError, TypeError, RuntimeError):
        raise unreadable from None
    # the batch axis N, another free axis by its name in the graph ('height'), or '?' where it has none
    shape = [d if d is not None else "N" if k == 0 else (net.input_axes[k] or "?")[:40]
             for k, d in enumerate(net.input_shape)]
    return Checked("onnx", dest.name, {"input_shape": shape, "nodes": len(net.nodes),
                                       "parameters": int(sum(b.numel() for b in net.buffers())), **info})


def check_weights(src: Path, out: Path, limits: Limits, filename: str) -> Checked:
    if not _is_safetensors(src) and _is_onnx(src):
        return _check_onnx(src, out, filename)
    fmt = "safetensors" if _is_safetensors(src) else "pt"
    dest = out / f"weights.{fmt}"
    shutil.move(src, dest)
    from sdb_core.weights import (  # torch: here only, in the caller's worker thread
        WeightsError,
        read_state_dict,
    )

    if fmt == "pt":
        with open(dest, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip, or a legacy pickle's protocol mark
            raise rejected("weights", f"{filename}: neither a safetensors file nor a torch checkpoint: give the "
                           "weights as torch.save(model.state_dict(), path) or safetensors' save_file")
    try:
        state = read_state_dict(dest)
    except WeightsError as e:
        reason = str(e).replace(f"cannot read weights from {dest}: ", "").replace(str(dest), filename)
        if fmt == "safetensors":
            raise rejected("weights", f"{filename}: not a valid safetensors file: {_clip(reason)}") from None
        raise rejected("weights", f"{filename}: not a safetensors file, and torch.load(weights_only=True) refused "
                       f"it: {_clip(reason)}") from None
    if not state:
        raise rejected("weights", f"{filename}: holds no tensors")
    return Checked(fmt, dest.name, {"tensors": len(state), "parameters": int(sum(t.numel() for t in state.values()))})


# ----------------------------------------------------------------------------- archives
def _open_zip(src: Path, purpose: str, filename: str, limits: Limits) -> zipfile.ZipFile:
    """The zip, its declared sizes within the limits (a bomb is refused before anything is unpacked)."""
    try:
        z = zipfile.ZipFile(src)
    except zipfile.BadZipFile:
        from sdb_core.bundle import BARE_ONNX_HINT

        hint = f": {BARE_ONNX_HINT}" if purpose == "bundle" and filename.lower().endswith(".onnx") else ""
        raise rejected(purpose, f"{filename}: not a zip archive{hint}") from None
    infos = z.infolist()
    if len(infos) > limits.members:
        z.close()
        raise rejected(purpose, f"{filename}: {len(infos)} archive members, over the limit of {limits.members}")
    total = sum(i.file_size for i in infos)
    if total > limits.unpacked_bytes:
        z.close()
        raise rejected(purpose, f"{filename}: unpacks to {total} bytes, over the limit of {limits.unpacked_bytes}")
    for info in infos:
        info.filename = _member_name(info)
    return z


def _member_name(info: zipfile.ZipInfo) -> str:
    """A member's name as its archiver meant it, in Unicode NFC: macOS's Archive Utility and ``ditto`` (and Windows
    tools in a UTF-8 code page) write UTF-8 names without the UTF-8 flag, which zipfile reads as cp437 (``café``
    became ``cafe╠ü``); such a name is read as UTF-8 when its bytes are valid UTF-8 (cp437 text seldom is), and
    macOS's decomposed form (NFD) is composed, so that a class folder has one name whichever tool zipped it. Windows
    PowerShell 5.1's ``Compress-Archive`` separates folders with ``\\`` (``cat\\0.png``): read as ``/``, so that
    :func:`member_problem`'s checks (``..``, absolute paths, drive letters) see the folders it names. Only the name
    is changed: ``orig_filename``, which ``ZipFile.open`` checks against the local header, is kept."""
    name = info.filename
    if not info.flag_bits & _UTF8_NAMES:
        try:
            name = info.orig_filename.encode("cp437").decode("utf-8")
        except UnicodeError:
            pass
    return unicodedata.normalize("NFC", name).replace("\\", "/")


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member may not be unpacked (it would leave its folder, or is not a plain file or folder). Its name is
    :func:`_member_name`'s, ``\\`` read as a folder separator."""
    name = info.filename.replace("\\", "/")
    if not name or "\x00" in name:
        return "has an unusable name"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "leaves the archive's folder (..)"
    mode = info.external_attr >> 16  # Unix mode, when the archiver recorded one (its type bits may be 0)
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is not a plain file or folder"
    return None


def _skipped(name: str | PurePosixPath) -> bool:
    """Hidden files and folders, an archiver's leftovers: the loader's own rule (``sdb_core.data.imagefolder``;
    imported here, in the check's worker thread, so that importing the app stays torch-free)."""
    from sdb_core.data.imagefolder import skipped

    return skipped(name)


def extract(z: zipfile.ZipFile, dest: Path, limits: Limits, purpose: str, filename: str) -> int:
    """Unpack ``z`` into ``dest`` member by member, counting the bytes actually written; files unpacked."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    budget, count = limits.unpacked_bytes, 0
    for info in z.infolist():
        problem = member_problem(info)
        if problem:
            raise rejected(purpose, f"{filename}: member {info.filename[:200]!r} {problem}")
        if _skipped(info.filename):
            continue
        target = (root / info.filename).resolve()
        if not target.is_relative_to(root):
            raise rejected(purpose, f"{filename}: member {info.filename[:200]!r} leaves the archive's folder")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as r, open(target, "xb") as w:
                while chunk := r.read(_CHUNK):
                    budget -= len(chunk)
                    if budget < 0:
                        raise rejected(purpose, f"{filename}: unpacks to more than {limits.unpacked_bytes} bytes")
                    w.write(chunk)
        except FileExistsError:
            raise rejected(purpose, f"{filename}: member {info.filename[:200]!r} is in the archive twice") from None
        except (NotADirectoryError, IsADirectoryError):
            raise rejected(purpose, f"{filename}: member {info.filename[:200]!r} is both a file and a folder") from None
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise rejected(purpose, f"{filename}: member {info.filename[:200]!r} is corrupt ({e})") from None
        except (RuntimeError, NotImplementedError):  # an encrypted member; a compression method zipfile lacks
            raise rejected(purpose, f"{filename}: member {info.filename[:200]!r} cannot be unpacked (encrypted, or "
                           "compressed by an unknown method): zip it again, deflated or stored, without a password") \
                from None
        count += 1
    return count


# ----------------------------------------------------------------------------- datasets
def check_dataset(src: Path, out: Path, limits: Limits, filename: str) -> Checked:
    with _open_zip(src, "dataset", filename, limits) as z:
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        if names and all(n.endswith(".npy") for n in names):
            z.close()
            return _check_npz(src, out, filename, limits)
        extract(z, out / "data", limits, "dataset", filename)
    return _check_imagefolder(out, filename, limits)


def _check_npz(src: Path, out: Path, filename: str, limits: Limits) -> Checked:
    from sdb_core.data.npz import describe_npz  # the loader's own rules (imports torch: here only)

    try:
        info = describe_npz(src, max_bytes=limits.unpacked_bytes, whole=True)
    except ValueError as e:
        raise rejected("dataset", f"{filename}: {_clip(str(e).replace(str(src), 'the archive'))}") from None
    dest = out / "data.npz"
    shutil.move(src, dest)
    return Checked("npz", dest.name, info)


def _data_root(folder: Path) -> Path:
    """The tree's root: a zip of a folder wraps the class folders in one more folder. Loose files beside that one
    folder (a README, a LICENSE, a labels.csv) are no class and are left out of it, as the loader leaves them."""
    from sdb_core.data.imagefolder import TEST_NAMES, TRAIN_NAMES

    while True:
        dirs = [p for p in folder.iterdir() if p.is_dir() and not _skipped(p.name)]
        if len(dirs) == 1 and any(c.is_dir() for c in dirs[0].iterdir()) \
                and dirs[0].name.lower() not in TRAIN_NAMES + TEST_NAMES:
            folder = dirs[0]
        else:
            return folder


def _check_imagefolder(out: Path, filename: str, limits: Limits) -> Checked:
    # the loader's own rules (imports torch: here only)
    from sdb_core.data.base import DatasetError
    from sdb_core.data.imagefolder import IMAGE_EXTENSIONS, class_images, split_dirs

    root = _data_root(out / "data")
    found_splits = split_dirs(root)
    if found_splits is None:
        splits = {"": root}
    elif found_splits[1] is None:
        splits = {"": found_splits[0]}
    else:
        splits = {found_splits[0].name: found_splits[0], found_splits[1].name: found_splits[1]}
    test = found_splits[1] if found_splits is not None else None
    classes: list[str] | None = None
    images = 0
    for split, folder in splits.items():
        where = f"{split}/" if split else "the archive's top level"
        dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not _skipped(p.name))
        if not dirs:
            raise rejected("dataset", f"{filename}: no class folders in {where}: expected <class>/<image files>")
        if classes is None:
            classes = [d.name for d in dirs]
            if len(classes) < 2:
                raise rejected("dataset", f"{filename}: one class folder ({classes[0]!r}); a classifier needs two")
            if (problem := name_problem(classes)) is not None:
                raise rejected("dataset", f"{filename}: its class folders name the classes, and {problem}")
        elif unknown := sorted({d.name for d in dirs} - set(classes)):
            raise rejected("dataset", f"{filename}: {where} has classes that are not in "
                           f"{found_splits[0].name}/: {unknown[:10]}")
        for d in dirs:
            try:
                found = class_images(d, root)  # a folder of classes or a split is no class: refused, as locally
            except DatasetError as e:
                raise rejected("dataset", f"{filename}: {e}") from None
            if not found:
                raise rejected("dataset", f"{filename}: class folder {d.relative_to(root)} holds no images "
                               f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
            for p in found:
                _image_header(p, limits, f"{filename}: {p.relative_to(root)}")
            images += len(found)
    if "" in splits and round(0.2 * images) == 0:
        raise rejected("dataset", f"{filename}: {images} images are too few to hold out a test split")
    return Checked("imagefolder", str(root.relative_to(out)), {
        "classes": classes, "images": images,
        "splits": f"{found_splits[0].name}/{test.name}" if test is not None else "80/20"})


def _image_header(path: Path, limits: Limits, what: str) -> None:
    """Refuse an image the loader could not read: one built to cost far more to decode than its size (the loader's own
    walk, :func:`~sdb_core.pixels.image_layout`), one of another format than its extensions', one past the pixel
    bound (from its header, before decoding), one whose data is cut short or corrupt (decoded whole: the header
    alone passed a truncated PNG, and every job on the set failed)."""
    from PIL import Image, UnidentifiedImageError

    from sdb_core.data.imagefolder import open_image

    try:
        with open_image(path) as im:
            w, h = im.size
            if w * h > limits.image_pixels:
                raise rejected("dataset", f"{what}: {w}×{h} pixels, over the limit of {limits.image_pixels}")
            im.load()
    except ApiError:
        raise
    except CostlyImage as e:
        raise rejected("dataset", f"{what}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError, EOFError):
        raise rejected("dataset", f"{what} is not a readable image (PNG, JPEG, BMP, GIF, TIFF, WebP or PPM, whole)") \
            from None


# ----------------------------------------------------------------------------- images
def check_image(src: Path, out: Path, limits: Limits, filename: str) -> Checked:
    from PIL import Image, UnidentifiedImageError

    try:
        with open_checked(src.read_bytes()) as im:
            if image_format(im) is None:
                raise rejected("image", f"{filename}: a {im.format} image; send {' or '.join(IMAGE_FORMATS)}")
            w, h = im.size
            if w * h > limits.image_pixels:
                raise rejected("image", f"{filename}: {w}×{h} pixels, over the limit of {limits.image_pixels}")
            fmt, mode = image_format(im).lower(), im.mode
            im.load()  # a truncated or corrupt file fails here, not in a job
    except ApiError:
        raise
    except CostlyImage as e:
        raise rejected("image", f"{filename}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError, EOFError):
        raise rejected("image", f"{filename}: not a readable {' or '.join(IMAGE_FORMATS)} image") from None
    dest = out / f"image.{'jpg' if fmt == 'jpeg' else fmt}"
    shutil.move(src, dest)
    return Checked(fmt, dest.name, {"width": w, "height": h, "mode": mode})


# ----------------------------------------------------------------------------- bundles
def read_bundle(src: Path, limits: Limits, filename: str, code: str = "bundle", *, standard_ops: bool = False) -> dict:
    """The verified ``meta.json`` of an ``.sdb`` (hashes checked; the sealed key is not opened here).

    ``standard_ops``: refuse a graph whose nodes use operators outside the ONNX standard (a deploy key's: ONNX
    Runtime's own, com.microsoft's fused attention or quantized kernels, and any other domain take inputs the
    ONNX spec never checked, and a tenant's graph runs in every server process; an admin may serve them)."""
    from sdb_core.bundle import MODEL_FILE, BundleError, check_class_names, read_bundle_files, verify
    from sdb_core.graph_size import STANDARD_DOMAINS, node_domains

    with _open_zip(src, code, filename, limits):
        pass
    try:
        files = read_bundle_files(src)
        meta = verify(files, filename)
        check_class_names(meta, filename)  # a new bundle: registered ones load without it (bundle.check_class_names)
    except BundleError as e:
        raise rejected(code, _clip(str(e).replace(str(src), filename))) from None
    foreign = node_domains(files[MODEL_FILE]) - STANDARD_DOMAINS if standard_ops else set()
    if foreign:
        raise rejected(code, f"its graph uses operators of {', '.join(sorted(d[:60] for d in foreign)[:5])}; a "
                       f"deploy key's graph may use the standard ONNX operators only "
                       f"({', '.join(sorted(STANDARD_DOMAINS))}): export without runtime-specific fusions, or ask an "
                       "admin to serve it")
    return meta


def check_bundle(src: Path, out: Path, limits: Limits, filename: str) -> Checked:
    meta = read_bundle(src, limits, filename)
    dest = out / "bundle.sdb"
    shutil.move(src, dest)
    return Checked("sdb", dest.name, {k: meta.get(k) for k in ("name", "version", "task", "mode")})


_CHECKS = {"weights": check_weights, "dataset": check_dataset, "image": check_image, "bundle": check_bundle}


def _clip(text: str, n: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def info_json(info: dict) -> str:
    return json.dumps(info, sort_keys=True)
