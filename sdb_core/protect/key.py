"""The secret key of a box: generation, blending, sealing at rest.

The key is one noise input ``k`` of the input's shape. For an image (C, H, W) it is the paper's noise
image: pixel values uniform in [0, 255], normalised like the inputs (per channel). For any other input
(a signal (C, L), a feature vector (D,)), whose raw scale nothing here knows, it is noise at the
normalised inputs' own scale: uniform, mean 0, variance 1 per value (a pixel-style key measured against
signals normalised from a narrow raw band was 2.6x their spread, and the keyed path of a 1-D CNN then
kept 52% of its teacher's 80%: tests/core/test_non_image_inputs.py). A keyed input is
``b_k(x) = λ·x + (1 − λ)·k``. At rest the key is sealed (``seal.py``) under the server's master key, so a
bundle on disk is useless without it.
"""
from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Sealing needs no torch and lives apart, so the service loads bundles without importing it.
from .seal import MASTER_KEY_BYTES, SealError, load_or_create_master_key, new_master_key, seal, unseal


def _from_levels(levels: Tensor, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Uniform levels 0..255, shaped (..., *in_shape), as keys on the inputs' normalised scale (see above), on the
    levels' device."""
    if len(in_shape) != 3:
        return (levels / 255.0 - 0.5) * 12 ** 0.5  # uniform on [-√3, √3]: mean 0, variance 1
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) not in (1, in_shape[0]) or len(std) != len(mean):
        raise ValueError(f"mean/std need one value per channel ({in_shape[0]}) or one, "
                         f"got {len(mean)} and {len(std)}")
    # Channel by channel with numbers: a per-channel tensor made here would be a copy from the host each batch
    # (on a GPU, one that waits for the device)
    x = levels / 255.0
    for c, (m, s) in enumerate(zip(mean, std)):
        channel = x if len(mean) == 1 else x[..., c, :, :]
        channel.sub_(m).div_(s)
    return x


def generate_key(in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """A fresh secret key from the OS's cryptographic RNG, shape ``in_shape``, normalised."""
    n = int(np.prod(in_shape))
    levels = np.frombuffer(secrets.token_bytes(n), dtype=np.uint8).astype(np.float32)
    return _from_levels(torch.from_numpy(levels.reshape(tuple(in_shape))), in_shape, mean, std)


def random_keys(
    n: int, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """``n`` non-secret keys from the same distribution (for key specificity and audits), on ``generator``'s
    device (the CPU without one)."""
    device = None if generator is None else generator.device
    levels = torch.randint(0, 256, (n, *in_shape), generator=generator, device=device).float()
    return _from_levels(levels, in_shape, mean, std)


# The most the inputs' spread may exceed a key's (std over all values): normalised images are at most 1.73x (a
# channel's raw std is at most 0.5, a key pixel's 1/sqrt(12)), other normalised inputs ~1x (digits 1.3,
# mnist-5k 1.1, mnist-textures 0.7, tones 1.0). Past it the key hides under the input: digits at 3x its
# normalised scale (4x a key) boxed with a keyed path that five random keys opened at 74-89% (the key: 96%), at
# 10x at 94-95% (the key: 97%); raw 0-255 pixels declared normalised (mean 0, std 1) are ~300x.
KEY_SCALE_MAX = 3.0


def check_key_scale(x: Tensor, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise ``ValueError`` when the inputs ``x`` (N, *in_shape) spread more than ``KEY_SCALE_MAX`` times the
    keys this module makes for them: inputs that are not normalised as ``mean``/``std`` say (raw 0-255 values),
    under which a key is hidden and any noise image opens the keyed path, silently (the self-check measures
    the key's path, not a guessed key's)."""
    sample = x[:10000].float()
    key = random_keys(1, in_shape, mean, std, generator=torch.Generator().manual_seed(0))[0]
    ratio = (sample.std() / key.std()).item() if len(sample) > 1 else 0.0
    if ratio > KEY_SCALE_MAX:
        raise ValueError(
            f"the inputs spread {ratio:.0f}x as wide as a key for them (std {sample.std().item():.3g} vs "
            f"{key.std().item():.3g}): they are not normalised as the data's mean {tuple(mean)} and std {tuple(std)} "
            "say, and a key blended into them would be hidden, so that any noise opened the keyed path. Give "
            "normalised inputs: images as (pixel / 255 - mean) / std (DataSplits.normalize), other inputs at zero "
            "mean and unit variance")


def blend(x: Tensor, key: Tensor, lam: float) -> Tensor:
    """``λ·x + (1 − λ)·k``; ``key`` is one key (of the input's shape) or one per sample (B, ...)."""
    return lam * x + (1.0 - lam) * key.to(device=x.device, dtype=x.dtype)


__all__ = [
    "KEY_SCALE_MAX",
    "MASTER_KEY_BYTES",
    "SealError",
    "blend",
    "check_key_scale",
    "generate_key",
    "load_or_create_master_key",
    "new_master_key",
    "random_keys",
    "seal",
    "unseal",
]
