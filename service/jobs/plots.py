"""Training curves as PNG (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path


def plot_curves(curves: dict[str, list[dict]], out: Path, title: str = "") -> Path | None:
    """One panel per phase, one line per metric against epochs; None when nothing was recorded."""
    phases = {k: v for k, v in curves.items() if v}
    if not phases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.6), squeeze=False)
    for ax, (phase, points) in zip(axes[0], phases.items()):
        names = [k for k in points[-1] if k not in ("epoch", "step", "steps", "x")]
        xs = [p["x"] for p in points]
        for n in names:
            ax.plot(xs, [p.get(n, float("nan")) for p in points], marker="o", markersize=3, label=n)
        ax.set_title(phase)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
