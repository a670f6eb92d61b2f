"""A small encoder-decoder for dense prediction (segmentation, depth, edges) with named stages.

The network is a plain chain of stages, ``enc1 .. encL`` (each after the first halves the
resolution) then ``dec{L-1} .. dec1`` (each doubles it) and a 1x1 ``head``. There are no skip
connections, so the output of any stage is all the rest of the network needs: a student can
"branch out" after any stage into another network's remaining stages (task branching).

Not in the ``create_model`` zoo: the zoo's contract is a classifier's (B, num_classes) logits
for any input >= 8 px, and every job kind that takes an ``arch`` relies on it.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class EncDec(nn.Module):
    """``in_channels`` image -> ``out_channels`` maps of the same size (input H, W divisible by 2**(L-1)).

    ``convs`` 3x3 convs per encoder stage; every decoder stage upsamples and has two.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, widths: Sequence[int] = (8, 16, 32),
                 convs: int = 2):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"widths needs >= 2 positive entries, got {widths!r}")
        if convs < 1:
            raise ValueError(f"convs must be >= 1, got {convs!r}")
        self.in_channels, self.out_channels, self.widths, self.convs = in_channels, out_channels, widths, convs
        stages: dict[str, nn.Module] = {}
        cin = in_channels
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i else []
            for k in range(convs):
                layers += _conv(cin if k == 0 else w, w)
            stages[f"enc{i + 1}"] = nn.Sequential(*layers)
            cin = w
        for i in range(len(widths) - 2, -1, -1):
            stages[f"dec{i + 1}"] = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                  *_conv(cin, widths[i]), *_conv(widths[i], widths[i]))
            cin = widths[i]
        stages["head"] = nn.Conv2d(cin, out_channels, 1)
        self.stages = nn.ModuleDict(stages)

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def stage_channels(self) -> list[int]:
        """Channels out of every stage, in order (the head's is ``out_channels``)."""
        enc = list(self.widths)
        dec = list(self.widths[-2::-1])
        return enc + dec + [self.out_channels]

    def index(self, name: str) -> int:
        names = self.stage_names
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names)}")
        return names.index(name)

    def forward_to(self, x: Tensor, stop: int) -> Tensor:
        """Run stages ``[0, stop)`` on the image (stop = len(stages) is the whole network)."""
        for stage in list(self.stages.values())[:stop]:
            x = stage(x)
        return x

    def forward_from(self, h: Tensor, start: int) -> Tensor:
        """Run stages ``[start, end)`` on ``h``, the output of stage ``start - 1``."""
        for stage in list(self.stages.values())[start:]:
            h = stage(h)
        return h

    def features(self, x: Tensor) -> list[Tensor]:
        out = []
        for stage in self.stages.values():
            x = stage(x)
            out.append(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from(x, 0)


def encdec_from_state(state: dict[str, Tensor]) -> EncDec:
    """An untrained ``EncDec`` shaped like the state dict (levels, widths, convs, in/out channels).

    So a weights file alone says what network it is; ValueError when it is not an EncDec's.
    """
    levels = 0
    while any(k.startswith(f"stages.enc{levels + 1}.") for k in state):
        levels += 1
    convs = [k for k in state if k.startswith("stages.enc1.") and state[k].dim() == 4]
    if levels < 2 or not convs:  # before reading widths: another network's names have no stages at all
        raise ValueError(f"not the weights of an encoder-decoder (EncDec): {levels} encoder stages found")
    stage_convs = [[k for k in state if k.startswith(f"stages.enc{i}.") and state[k].dim() == 4]
                   for i in range(1, levels + 1)]
    if not all(stage_convs):
        raise ValueError("not the weights of an encoder-decoder (EncDec): an encoder stage has no convolution")
    try:
        widths = [int(state[max(ws, key=lambda k: int(k.split(".")[2]))].shape[0]) for ws in stage_convs]
        in_channels = int(state[min(convs, key=lambda k: int(k.split(".")[2]))].shape[1])
        out_channels = int(state["stages.head.weight"].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"not the weights of an encoder-decoder (EncDec): {e}") from None
    return EncDec(in_channels, out_channels, widths, len(convs))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["EncDec", "count_params", "encdec_from_state"]
