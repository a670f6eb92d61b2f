"""DEPARA's settings and names, torch-free: the service and the CLI read them without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

# The methods ``depara.rank_transferability`` ranks the sources by (see ``depara``); ``depara`` imports them.
METHODS = ("depara", "depara_v", "depara_e", "rsa", "random")

# Probe images the CLI and the job read by default: 250 scored within 0.01 mean Spearman of 1,000 on both
# validation zoos of benchmarks/depara.py (docs/notes/transfer.md).
DEFAULT_PROBE = 250

# What the attribution maps differentiate: "sum", the sum of the layer's output (the definition);
# "norm", its L2 norm per image (the authors' KamalEngine code), which a few large units dominate less.
ATTRIBUTIONS = ("sum", "norm")


@dataclass
class DeparaConfig:
    method: str = "depara"
    # The defaults are the benchmark's choice on its validation zoo (benchmarks/depara.py --select-on-seed 1).
    lam: float = 1.0  # lambda: weight of the edge term (1 and 10 in the paper)
    batch_size: int = 50  # probe images per forward/backward pass
    centre: bool = True  # centre the features over the probe set before the edges and RSA (the authors' code)
    attribution: str = "sum"  # what the maps differentiate: one of ATTRIBUTIONS
    seed: int = 0  # for the random baseline

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.attribution not in ATTRIBUTIONS:
            raise ValueError(f"attribution must be one of {', '.join(ATTRIBUTIONS)}, got {self.attribution!r}")
