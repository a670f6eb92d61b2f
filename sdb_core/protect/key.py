"""The secret key of a box: generation, blending, sealing at rest.

The key is one noise image ``k`` with pixel values uniform in [0, 255], normalised like
the inputs. A keyed input is ``b_k(x) = λ·x + (1 − λ)·k``. At rest the key is sealed
(``seal.py``) under the server's master key, so a bundle on disk is useless without it.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Sealing needs no torch and lives apart, so the service loads bundles without importing it.
from .seal import MASTER_KEY_BYTES, SealError, load_or_create_master_key, new_master_key, seal, unseal


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


__all__ = [
    "MASTER_KEY_BYTES",
    "SealError",
    "blend",
    "generate_key",
    "load_or_create_master_key",
    "new_master_key",
    "random_keys",
    "seal",
    "unseal",
]
