"""Sealing a key at rest: AES-256-GCM under the server's master key.

Only numpy and cryptography: the service opens bundles without importing torch, which
would cost seconds of cold start.
"""
from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MASTER_KEY_BYTES = 32
_MAGIC = b"SDBKEY1\0"
_NONCE = 12


class SealError(ValueError):
    """A sealed key could not be opened: wrong master key, or the bytes were altered."""


def seal(key, master_key: bytes, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate ``key`` (an array or a CPU tensor) and ``aad`` under ``master_key``.

    ``aad`` is what the key is bound to (a bundle's: ``sdb_core.bundle.key_aad``): ``unseal`` opens
    the key only with the same bytes.
    """
    _check_master(master_key)
    arr = np.asarray(key.detach().cpu() if hasattr(key, "detach") else key, dtype=np.float32)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    nonce = os.urandom(_NONCE)
    return _MAGIC + nonce + AESGCM(master_key).encrypt(nonce, buf.getvalue(), _MAGIC + aad)


def unseal(blob: bytes, master_key: bytes, aad: bytes = b"") -> np.ndarray:
    _check_master(master_key)
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE + 16:
        raise SealError("not a sealed SDB key (bad header or truncated)")
    nonce = blob[len(_MAGIC):len(_MAGIC) + _NONCE]
    try:
        raw = AESGCM(master_key).decrypt(nonce, blob[len(_MAGIC) + _NONCE:], _MAGIC + aad)
    except InvalidTag:
        raise SealError("the sealed key could not be opened: wrong master key, or the key, the bundle "
                        "metadata or the network it is bound to was altered") from None
    return np.load(io.BytesIO(raw), allow_pickle=False)


def _check_master(master_key: bytes) -> None:
    if not isinstance(master_key, (bytes, bytearray)) or len(master_key) != MASTER_KEY_BYTES:
        raise SealError(f"the master key must be {MASTER_KEY_BYTES} bytes")


def new_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_BYTES)


def load_or_create_master_key(path: str | os.PathLike) -> bytes:
    """Read the master key file (hex), creating it with mode 0600 on first use.

    Created whole or not at all: the key is written to a private temporary file beside it, which is then
    linked in place (exclusive: a key another process linked first wins, and theirs is read). Created in place,
    a process starting beside the creator (a server and its worker on a first start) could read it empty."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new_master_key().hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, p)
            except FileExistsError:  # another process created it first: read theirs
                pass
        finally:
            tmp.unlink(missing_ok=True)
    text = p.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SealError(f"master key file {p} is not hex") from None
    _check_master(key)
    return key


