"""The secret key of a box: generation, blending, sealing at rest.

The key is one noise image ``k`` with pixel values uniform in [0, 255], normalised like
the inputs. A keyed input is ``b_k(x) = λ·x + (1 − λ)·k``. At rest the key is sealed with
AES-256-GCM under the server's master key, so a bundle on disk is useless without it.
"""
from __future__ import annotations

import io
import os
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from torch import Tensor

MASTER_KEY_BYTES = 32
_MAGIC = b"SDBKEY1\0"
_NONCE = 12


class SealError(ValueError):
    """A sealed key could not be opened: wrong master key, or the bytes were altered."""


def _normalise(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels / 255.0 - m) / s


def generate_key(in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """A fresh secret key from the OS's cryptographic RNG, shape ``in_shape``, normalised."""
    n = int(np.prod(in_shape))
    pixels = np.frombuffer(secrets.token_bytes(n), dtype=np.uint8).astype(np.float32)
    return _normalise(torch.from_numpy(pixels.reshape(tuple(in_shape))), mean, std)


def random_keys(
    n: int, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` non-secret keys from the same distribution (for key specificity and audits)."""
    pixels = torch.randint(0, 256, (n, *in_shape), generator=generator).float()
    return _normalise(pixels, mean, std)


def blend(x: Tensor, key: Tensor, lam: float) -> Tensor:
    """``λ·x + (1 − λ)·k``; ``key`` is one key (C,H,W) or one per sample (B,C,H,W)."""
    return lam * x + (1.0 - lam) * key.to(device=x.device, dtype=x.dtype)


def seal(key: Tensor, master_key: bytes, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate ``key`` (and ``aad``) under ``master_key``."""
    _check_master(master_key)
    arr = key.detach().cpu().to(torch.float32).numpy()
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    nonce = os.urandom(_NONCE)
    return _MAGIC + nonce + AESGCM(master_key).encrypt(nonce, buf.getvalue(), _MAGIC + aad)


def unseal(blob: bytes, master_key: bytes, aad: bytes = b"") -> Tensor:
    _check_master(master_key)
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE + 16:
        raise SealError("not a sealed SDB key (bad header or truncated)")
    nonce = blob[len(_MAGIC):len(_MAGIC) + _NONCE]
    try:
        raw = AESGCM(master_key).decrypt(nonce, blob[len(_MAGIC) + _NONCE:], _MAGIC + aad)
    except InvalidTag:
        raise SealError("the sealed key could not be opened: wrong master key, "
                        "or the key or bundle metadata was altered") from None
    return torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False).copy())


def _check_master(master_key: bytes) -> None:
    if not isinstance(master_key, (bytes, bytearray)) or len(master_key) != MASTER_KEY_BYTES:
        raise SealError(f"the master key must be {MASTER_KEY_BYTES} bytes")


def new_master_key() -> bytes:
    return secrets.token_bytes(MASTER_KEY_BYTES)


def load_or_create_master_key(path: str | os.PathLike) -> bytes:
    """Read the master key file (hex), creating it with mode 0600 on first use."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: read theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(new_master_key().hex() + "\n")
    text = p.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise SealError(f"master key file {p} is not hex") from None
    _check_master(key)
    return key


__all__ = ["SealError", "blend", "generate_key", "random_keys", "seal", "unseal", "new_master_key",
           "load_or_create_master_key", "MASTER_KEY_BYTES"]
