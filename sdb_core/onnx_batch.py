"""A graph exported at one batch size, read at any: where the export stored its batch.

``torch.onnx.export`` without ``dynamic_axes`` (its default) stores the batch it traced at in every reshape's
target, and the dynamo exporter (torch's default) also folds weights expanded to the batch into stored tensors
(a ViT's ``cls.expand(N, -1, -1)`` becomes a (N, 1, E) tensor of repeated rows). Run at another batch, the graph
needs to know where that batch went, and the stored sizes alone do not say: sequence-first attention reshapes
(T, N, E) into (T, N·heads, d) and back into (T·N, E), and at N = 1 the views (T·N, heads, d) and
(T, N·heads, d) hold the same numbers in the same order; a stored (1, 1, E) may be a token for the batch or
one that broadcasts. Only what the graph does next tells them apart (a product across the wrong axis lets
samples meet; a concatenation fails).

:func:`calibrate` settles it by experiment: each sample run alone at the export's batch (as copies of itself)
gives every tensor of the graph its answer; then the graph runs a few samples at once, each reshape reading its
stored sizes one way (``onnx_ops.batch_readings``, the likeliest first), each expand of one row to a stored size
of the export's batch as the batch or as that size, and each stored tensor of repeated slices as stored or as
its first slice for the batch, and a reading is kept only where every tensor holds each sample's answer along
one axis grown with the batch. A tensor that does not is blamed on the readings upstream of it, and the search
backs off to the latest of those (conflict-directed backjumping), so a wrong reading in a model's first layer
is not retried against every reading after it; readings found for one reshape are tried first for the next
one alike (layers repeat).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

MAX_RUNS = 256  # partial forward passes: each stops at the first tensor a reading spoils
KEPT_BYTES = 1 << 30  # each sample's tensors kept to judge readings by, all samples together


class Misread(Exception):
    """A tensor that does not hold each sample's answer under the readings tried."""

    def __init__(self, tensor: str):
        super().__init__(tensor)
        self.tensor = tensor


def at_batch(net: nn.Module, x: Tensor, size: int) -> Tensor:
    """``net``'s answers to ``x`` run ``size`` rows at a time (the last chunk filled with its first row)."""
    out = []
    for i in range(0, len(x), size):
        chunk = x[i:i + size]
        out.append(net(torch.cat([chunk, chunk[:1].expand(size - len(chunk), *x.shape[1:])]))[:len(chunk)])
    return torch.cat(out)


def holds(got: Tensor, alone: list[Tensor], b0: int) -> bool:
    """Whether ``got``, a tensor of a batch of ``len(alone)`` samples, holds along one axis what ``alone[i]`` (the same
    tensor for sample i run alone as ``b0`` copies) holds for each: the axis that grew with the batch, the batch a
    factor of it (outer, batch, inner), as the copies are in ``alone``'s. One that did not grow is not judged: sizes
    made a tensor (a scale from a head's width) may hold the batch's size."""
    n, ref = len(alone), alone[0]
    if got.dim() != ref.dim():
        return False
    axes = [k for k in range(ref.dim()) if got.shape[k] != ref.shape[k]]
    if not axes:
        return True
    a = axes[0]
    if len(axes) > 1 or ref.shape[a] % b0 or got.shape[a] != ref.shape[a] // b0 * n:
        return False
    same = close if ref.is_floating_point() else torch.equal
    per = ref.shape[a] // b0

    def split(t: Tensor, outer: int, size: int) -> Tensor:  # the grown axis as (outer, batch, inner)
        return t.reshape(*t.shape[:a], outer, size, per // outer, *t.shape[a + 1:])

    for outer in (d for d in range(1, per + 1) if per % d == 0):
        samples = split(got, outer, n)
        if all(same(samples.select(a + 1, i), split(alone[i], outer, b0).select(a + 1, 0)) for i in range(n)):
            return True
    return False


def close(p: Tensor, q: Tensor) -> bool:
    """Whether ``p`` answers as ``q`` does, to a graph run's precision (relative to ``q``'s largest value)."""
    return torch.allclose(p, q, rtol=1e-3, atol=1e-4 * (1 + (q.abs().max().item() if q.numel() else 0.0)))


def upstream(nodes: list[tuple], stored: list[str]) -> tuple[dict[str, frozenset], dict[str, frozenset]]:
    """The readings (reshapes, expands, ``stored`` tensors) each tensor and each node depends on: (by tensor, by
    node)."""
    by_tensor: dict[str, frozenset] = {name: frozenset({name}) for name in stored}
    by_node: dict[str, frozenset] = {}
    for name, op, ins, outs, _ in nodes:
        deps = frozenset().union(*(by_tensor.get(i, frozenset()) for i in ins if i))
        if op in ("Reshape", "Expand"):
            deps |= {name}
        by_node[name] = deps
        by_tensor.update((o, deps) for o in outs)
    return by_tensor, by_node


class Search:
    """The readings tried, node by node in the order the graph asks for them, and how to back off."""

    def __init__(self, by_node: dict[str, frozenset]):
        self.by_node = by_node
        self.picked: dict[str, int] = {}  # index into offered[node]
        self.offered: dict[str, list] = {}
        self.order: list[str] = []
        self.conflicts: dict[str, set[str]] = {}  # readings blamed beside a node's, for its failed ones
        self.last: dict[tuple, int | None] = {}  # the reading last taken for a reshape alike

    def choose(self, node: str, options: list, like: tuple) -> int | None:
        if node not in self.picked:  # its options change only with the readings before it, which start it over
            first = self.last.get(like, options[0])
            self.offered[node] = [first, *(r for r in options if r != first)] if first in options else options
            self.picked[node] = 0
            self.conflicts[node] = set()
            self.order.append(node)
        self.last[like] = self.offered[node][self.picked[node]]
        return self.last[like]

    def readings(self) -> dict[str, int | None]:
        return {node: self.offered[node][self.picked[node]] for node in self.order}

    def back_off(self, blamed: frozenset | set | None) -> bool:
        """The next readings to try after a failure ``blamed`` on these reshapes (None: on any); False when none."""
        blamed = set(blamed) if blamed is not None else set(self.order)
        if not blamed & set(self.order):  # a reshape the graph analysis does not see (inside an If's branch)
            blamed = set(self.order)
        while True:
            live = [d for d in self.order if d in blamed]
            if not live:
                return False
            d = live[-1]
            while self.order[-1] != d:
                self._undo()
            self.conflicts[d] |= blamed - {d}
            if self.picked[d] + 1 < len(self.offered[d]):
                self.picked[d] += 1
                return True
            blamed = self.conflicts[d]
            self._undo()

    def _undo(self) -> None:
        node = self.order.pop()
        del self.picked[node], self.conflicts[node]


def calibrate(x: Tensor, b0: int, run: Callable[[Tensor, Callable | None, Callable | None], Tensor],
              nodes: list[tuple], output: str, stored: list[str]) -> dict[str, int | None] | None:
    """The readings under which a graph exported at batch ``b0`` answers a few rows of ``x`` at once as each alone,
    or None. ``run(x, choose, watch)`` runs the graph with readings from ``choose(name, options, like)`` (of its
    reshapes, and of the ``stored`` tensors that may repeat along the batch) and ``watch(outs, env)`` called after
    each node."""
    n = 3 if b0 != 3 else 2  # another batch size than the export's, with samples to meet
    x = x[:n]
    alone: dict[str, list[Tensor]] = {}  # each node's outputs for each sample alone, at the export's batch
    room = [KEPT_BYTES // n]  # past it (a large graph at a large export batch), tensors are not judged
    first = [True]

    def keep(outs, env) -> None:
        for o in outs:
            t = env.get(o)
            if not o or not isinstance(t, Tensor):
                continue
            size = t.numel() * t.element_size()
            if first[0] and (o == output or size <= room[0]):
                room[0] -= size
                alone[o] = [t]
            elif not first[0] and o in alone:  # every sample keeps the tensors the first kept
                alone[o].append(t)

    def check(outs, env) -> None:
        for o in outs:
            if o in alone and isinstance(env.get(o), Tensor) and not holds(env[o], alone[o], b0):
                raise Misread(o)

    by_tensor, by_node = upstream(nodes, stored)
    search = Search(by_node)
    with torch.no_grad():
        for i in range(n):
            first[0] = i == 0
            run(x[i:i + 1].expand(b0, *x.shape[1:]), None, keep)
        for _ in range(MAX_RUNS):
            try:
                got = run(x, search.choose, check)
                if got.shape[:1] == (n,) and holds(got, alone[output], b0):  # one answer per sample, its own
                    return search.readings()
                blamed = by_tensor.get(output)
            except Misread as e:
                blamed = by_tensor.get(e.tensor)
            except ValueError as e:  # an operator refused the shapes it was given (OnnxModule names the node)
                blamed = by_node.get(getattr(e, "node", ""))
            except RuntimeError:
                blamed = None
            if not search.back_off(blamed):
                return None
    return None
