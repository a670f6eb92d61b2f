"""Uploaded files: what a key may name in its jobs instead of a server path.

An upload is streamed to a private staging folder under ``<data_dir>/files/.staging/``, counted
against ``max_file_bytes`` as it arrives, checked for its purpose (:mod:`service.filechecks`),
and only then moved into ``<data_dir>/files/<id>/`` and recorded in the store: a refused or
broken upload leaves neither a file nor a row. A file belongs to the key that uploaded it; an
admin may share one with every key. :func:`resolve_file` is how the rest of the service turns
a ``file-…`` id into a path, checking who asks; no server path is shown to a non-admin key.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from .auth import ApiKey
from .errors import ApiError, bad_request, invalid, no_room, not_found, room_for
from .filechecks import PURPOSES, Checked, Limits, check_upload, info_json, rejected
from .settings import Settings
from .store import RESERVATION_TTL_S, FileRow, Store

FILE_ID_RE = re.compile(r"file-[0-9a-f]{24}")
STAGING = ".staging"
STAGING_MAX_AGE_S = 6 * 3600  # a staging folder this old belongs to a process that died mid-upload
_WRITE_AT = 1 << 20  # buffered bytes handed to a thread for writing
_MAX_FIELDS, _MAX_FIELD_BYTES = 8, 1024


# A write the disk had no room for: full, over a quota, past a file size limit.
def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def limits(settings: Settings) -> Limits:
    return Limits(unpacked_bytes=settings.max_unpacked_bytes, members=settings.max_archive_members)


def clean_filename(name: str | None) -> str:
    """The client's file name for display: its last path part, printable, at most 200 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in unicodedata.normalize("NFC", base) if c.isprintable()).strip().lstrip(".")
    return base[:200] or "upload"


# ----------------------------------------------------------------------------- receiving
class Staging:
    """A private folder for one upload, removed on exit whatever happened (what passed was moved out)."""

    def __init__(self, files_dir: Path):
        self.root = files_dir / STAGING

    async def __aenter__(self) -> Self:
        self.dir = await run_in_threadpool(self._make)
        return self

    def _make(self) -> Path:
        with room_for("the upload"):
            self.root.mkdir(parents=True, exist_ok=True)
            sweep(self.root)
            d = self.root / secrets.token_hex(8)
            d.mkdir(mode=0o700)
        return d

    async def __aexit__(self, *_: object) -> None:
        await run_in_threadpool(shutil.rmtree, self.dir, True)


def sweep(root: Path, max_age_s: float = STAGING_MAX_AGE_S) -> None:
    """Remove staging folders left by a process that died mid-upload."""
    cutoff = time.time() - max_age_s
    for d in root.iterdir():
        try:
            if d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
        except FileNotFoundError:
            continue


@dataclass
class Received:
    path: Path | None = None  # the file part, in the staging folder
    filename: str = "upload"
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _Form:
    """python-multipart callbacks: text fields kept (small), the one file part streamed to disk."""

    def __init__(self, dest: Path, max_bytes: int, file_field: str):
        self.dest, self.max_bytes, self.file_field = dest, max_bytes, file_field
        self.got = Received()
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self._hash = hashlib.sha256()
        self._headers: dict[bytes, bytes] = {}
        self._name, self._value = b"", b""
        self._field: str | None = None
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._hend, "on_headers_finished": self._hdone, "on_part_data": self._pdata,
                "on_part_end": self._pend}

    def _begin(self) -> None:
        self._headers, self._field, self._is_file, self._data = {}, None, False, bytearray()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _hend(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def _hdone(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in opts:
            raise bad_request("a multipart part has no name", "malformed_body")
        self._field = opts[b"name"].decode("utf-8", "replace")
        if self._field == self.file_field:
            if self.got.path is not None:
                raise bad_request(f"send one file, as field {self.file_field!r}", "malformed_body")
            self._is_file = True
            self.got.path = self.dest
            self.got.filename = clean_filename(opts.get(b"filename", b"").decode("utf-8", "replace"))
        elif b"filename" in opts:
            raise bad_request(f"unexpected file in field {self._field!r}: send the file as {self.file_field!r}",
                              "malformed_body")
        elif len(self.got.fields) >= _MAX_FIELDS:
            raise bad_request("too many form fields", "malformed_body")

    def _pdata(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not self._is_file:
            self._data += chunk
            if len(self._data) > _MAX_FIELD_BYTES:
                raise bad_request(f"form field {self._field!r} is over {_MAX_FIELD_BYTES} bytes", "malformed_body")
            return
        self.got.size += len(chunk)
        if self.got.size > self.max_bytes:
            raise ApiError(413, "file_too_large", f"the file is over the {self.max_bytes}-byte limit (SDB_MAX_FILE_BYTES)")
        self._hash.update(chunk)
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)

    def _pend(self) -> None:
        if not self._is_file and self._field is not None:
            self.got.fields[self._field] = self._data.decode("utf-8", "replace")

    def take(self) -> bytes:
        out = b"".join(self.pending)
        self.pending, self.pending_bytes = [], 0
        return out

    def done(self) -> Received:
        self.got.sha256 = self._hash.hexdigest()
        return self.got


async def receive(request: Request, stage: Staging, max_bytes: int, file_field: str = "file") -> Received:
    """Stream a ``multipart/form-data`` body: the part ``file_field`` to a file in ``stage``, text fields
    (a few, small) to ``fields``. 413 past ``max_bytes`` (nothing more is read), 400 on a malformed body."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("multipart body without a boundary", "malformed_body")
    form = _Form(stage.dir / "upload", max_bytes, file_field)
    parser = MultipartParser(boundary, form.callbacks())
    with room_for("the upload"), open(form.dest, "wb") as out:  # noqa: ASYNC230  (opening is instant; the writes
        # go to a thread; the staging folder goes with ``stage``)
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                if form.pending_bytes >= _WRITE_AT:
                    await run_in_threadpool(out.write, form.take())
            parser.finalize()
        except FormParserError:
            raise bad_request("malformed multipart body", "malformed_body") from None
        await run_in_threadpool(out.write, form.take())
    got = form.done()
    if got.path is None:
        raise invalid(f"multipart body has no file: send it as field {file_field!r}", "invalid_request")
    return got


# ----------------------------------------------------------------------------- keeping
def ingest(store: Store, settings: Settings, key: ApiKey, stage: Staging, got: Received, purpose: str,
           shared: bool) -> FileRow:
    """Blocking: check the received file, move it into place and record it; on any failure nothing stays."""
    if got.size == 0:
        raise invalid("the file is empty", "empty_file")
    reservations = [] if key.grants("admin") else [reserve(store, settings, key.id, got.size,
                                                                   f"this {got.size}-byte file")]
    try:
        checked: Checked = check_upload(purpose, got.path, stage.dir / "out", limits(settings), got.filename)
        # What the cap counts is what the file keeps on the server: an image folder's zip is kept unpacked (a 300 KB
        # zip of zeros held 300 MB), so the bytes past the upload's are held too, or 413.
        kept = max(got.size, _bytes_under(stage.dir / "out"))
        if reservations and kept > got.size:
            reservations.append(reserve(store, settings, key.id, kept - got.size,
                                        f"this file, unpacked to {kept} bytes ({kept - got.size} more than sent),"))
        file_id = new_file_id()
        final = settings.files_dir / file_id
        os.replace(stage.dir / "out", final)
        row = FileRow(id=file_id, owner=key.id, purpose=purpose, filename=got.filename, size=kept,
                      sha256=got.sha256, format=checked.format, stored=checked.stored, info=info_json(checked.info),
                      shared=shared, created_at=time.time())
        try:
            store.add_file(row, *reservations)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
    except BaseException as e:
        for reservation in reservations:
            store.release_file_bytes(reservation)
        full = no_room(e, "the file")
        if full is not None:
            raise full from None
        raise
    store.audit(key.id, "file.upload", file_id, f"{purpose} {checked.format} {got.size} bytes"
                + (" shared" if shared else ""))
    return row


def reserve(store: Store, settings: Settings, owner: str, size: int, what: str) -> str:
    """Hold ``size`` bytes of key ``owner``'s storage cap (its files and the model versions it deployed, together);
    413 ``storage_exceeded`` when they do not fit, naming ``what``."""
    cap = settings.max_file_storage_per_key
    reservation, kept, held = store.reserve_file_bytes(owner, size, cap)
    if reservation is None:
        raise ApiError(413, "storage_exceeded", _over_cap(kept, held, cap, what))
    return reservation


def _over_cap(kept: int, held: int, cap: int, what: str) -> str:
    """Why ``what`` does not fit the cap, and what to do: the bytes that uploads and deploys still being checked
    hold are told apart from those kept (a crashed server's were counted as kept: "delete some", with nothing to
    delete)."""
    checked = (f", and its uploads and deploys being checked hold {held} more (those of a server that stopped "
               f"mid-check are let go within {RESERVATION_TTL_S:.0f} s)") if held else ""
    todo = "delete some files (DELETE /v1/files/{id}) or model versions (DELETE /v1/models/{name})"
    todo = f"retry once those being checked are done, or {todo}" if held else f"{todo} first"
    return (f"this key keeps {kept} bytes of files and deployed models{checked}, and may keep {cap} "
            f"(SDB_MAX_FILE_STORAGE_PER_KEY): {what} does not fit; {todo}")


def _bytes_under(path: Path) -> int:
    """The bytes of the files under ``path`` (a file: its own)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def parse_purpose(value: str | None) -> str:
    if value is None:
        raise invalid(f"purpose is required: one of {', '.join(PURPOSES)}", "invalid_request")
    if value not in PURPOSES:
        raise invalid(f"purpose must be one of {', '.join(PURPOSES)}, got {value[:50]!r}", "invalid_request")
    return value


def parse_flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", ""):
        return False
    raise invalid(f"{name} must be true or false, got {value[:20]!r}", "invalid_request")


def file_path(settings: Settings, row: FileRow) -> Path:
    return settings.files_dir / row.id / row.stored


def public(row: FileRow, key: ApiKey, settings: Settings) -> dict:
    """What a key sees of a file; the owner and the server path only for an admin key."""
    out = {"id": row.id, "object": "file", "purpose": row.purpose, "filename": row.filename, "bytes": row.size,
           "sha256": row.sha256, "format": row.format, "info": json.loads(row.info or "{}"), "shared": row.shared,
           "created_at": row.created_at}
    if key.grants("admin"):
        out.update(owner=row.owner, path=str(file_path(settings, row).resolve()))
    return out


# ----------------------------------------------------------------------------- resolving
def visible(row: FileRow | None, key: ApiKey) -> bool:
    return row is not None and (row.owner == key.id or row.shared or key.grants("admin"))


def get_visible(store: Store, key: ApiKey, file_id: str) -> FileRow:
    """The file if this key may use it; 404 otherwise (another key's file is not told apart from none)."""
    row = store.get_file(file_id) if FILE_ID_RE.fullmatch(file_id or "") else None
    if not visible(row, key):
        raise not_found(f"no file with id {str(file_id)[:64]!r}", "file_not_found")
    return row


def resolve_file(store: Store, settings: Settings, key: ApiKey, file_id: str, purpose: str) -> Path:
    """The checked file (or dataset folder) of ``file_id`` for a job or a deploy: the key's own, a shared
    one, or any with an admin key; 404 if none of these, 422 if uploaded for another purpose."""
    row = get_visible(store, key, file_id)
    if row.purpose != purpose:
        raise rejected(purpose, f"file {row.id} was uploaded as {row.purpose}, not {purpose}")
    path = file_path(settings, row)
    if not path.exists():  # removed under us: the row goes with the next delete
        raise not_found(f"no file with id {file_id!r}", "file_not_found")
    return path


def dataset_name(store: Store, settings: Settings, key: ApiKey, file_id: str) -> str:
    """What ``sdb_core.data.load_dataset`` takes for an uploaded dataset: ``imagefolder:PATH`` or ``npz:PATH``."""
    path = resolve_file(store, settings, key, file_id, "dataset")
    return f"{'npz' if path.suffix == '.npz' else 'imagefolder'}:{path}"


def delete(store: Store, settings: Settings, key: ApiKey, file_id: str) -> FileRow:
    """Blocking: remove the row, then the folder (a resolve in between finds no row, never half a file)."""
    row = get_visible(store, key, file_id)
    if row.owner != key.id and not key.grants("admin"):
        raise ApiError(403, "file_not_owned", f"file {row.id} is shared with this key, not owned by it")
    removed = store.delete_file(row.id)
    if removed is None:
        raise not_found(f"no file with id {file_id!r}", "file_not_found")
    shutil.rmtree(settings.files_dir / row.id, ignore_errors=True)
    store.audit(key.id, "file.delete", row.id, row.purpose)
    return removed
