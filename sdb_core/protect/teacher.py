"""What a classifier must be to be wrapped, checked once before any training: the owner learns what is
wrong with their model in their own terms, not from an index error deep in a loss."""
from __future__ import annotations

import contextlib
import copy
import io
import math
import weakref

import torch
from torch import nn

from ..bundle import per_sample_fault
from ..train import device_of, evaluating, logits_of


class Logits(nn.Module):
    """The network of a teacher whose forward answers ``{"logits": z}`` or an object with ``.logits`` (a HuggingFace
    ``ModelOutput``, a dataclass): it answers ``z`` (:func:`~sdb_core.train.logits_of`), so the box trains, exports
    and serves the logits alone."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


class Renormalized(nn.Module):
    """A network trained on inputs normalised otherwise than the data's: it gets ``(raw - mean) / std`` of its own
    from the data's ``(raw - data_mean) / data_std``, per channel (one value: every channel), an affine map the
    box trains through and exports with the network."""

    def __init__(self, net: nn.Module, data_norm, own_norm, in_shape) -> None:
        super().__init__()
        channels, view = int(in_shape[0]), (1, -1) + (1,) * (len(in_shape) - 1)
        dm, ds = (_per_channel(v, channels, "the data's") for v in data_norm)
        m, s = (_per_channel(v, channels, "the network's") for v in own_norm)
        self.net = net
        self.register_buffer("scale", (ds / s).view(view))
        self.register_buffer("shift", ((dm - m) / s).view(view))
        mine = f"the network takes inputs normalised by mean {shown(m)}, std {shown(s)}: the data's are mapped to them"
        self.why = f"{net.why}; {mine}" if hasattr(net, "why") else mine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)


def _per_channel(values, channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if len(t) == 1:
        return t.expand(channels).clone()
    if len(t) != channels:
        raise ValueError(f"{what} normalisation has {len(t)} values; the inputs have {channels} channels (give one "
                         "value, or one per channel)")
    return t


def shown(values) -> str:
    """Per-channel values (a normalisation's mean or std) as a message shows them: the first eight, 4 digits each."""
    values = [float(v) for v in values]
    return "(" + ", ".join(f"{v:.4g}" for v in values[:8]) + (", ...)" if len(values) > 8 else ")")


# Probabilities are clamped here before their logarithm: float32 softmax rows underflow to 0 (log: -inf).
_TINY = 1e-30


class FromProbabilities(nn.Module):
    """The network of a teacher that answers class probabilities (a softmax at its end, as many exported
    classifiers do): it answers their logarithms, which are logits up to a per-row constant, so the soft labels
    softmax(log p / T) and the top-1 are the teacher's own."""

    why = "the teacher answers probabilities: its log-probabilities are the logits the box learns and serves"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _log_probabilities(logits_of(self.model(x)))


def _log_probabilities(p: torch.Tensor) -> torch.Tensor:
    """log p, from log(:data:`_TINY`) = -69 up: the logits a teacher's probabilities are read for."""
    return torch.log(p.clamp_min(_TINY))


# The logit spread (largest minus smallest, on each input the check scores) past which a teacher's soft labels at
# the box's temperature (T = 4) are its hard labels: a class 200 below the top gets e^-50 of it, and float32
# resolves the top's soft label to 2^-24 = e^-16.6, so every class past 67 below the top weighs nothing.
# Trained as usual, a teacher spreads far less: the zoo's mlp, cnn, lenet and resnet8 on digits and mnist-5k
# (6 and 30 epochs) up to 30 on the two inputs the check scores and 49 over 512 training inputs, an MLP
# overtrained for 500 epochs 47-54 and 100.
# A last layer scaled x10 (-170..130) wrapped only at the check's 3rd or 4th attempt, x30 and x100
# (+-500 to +-2,000) never (best public 35-92 % vs 93-98 %), the same network ending in a softmax at its 2nd or 3rd.
_SATURATED_SPREAD = 200.0


class FromSaturatedLogits(FromProbabilities):
    """The network of a teacher whose logits spread past :data:`_SATURATED_SPREAD` on every input the check
    scores (a last layer scaled up: +-500 and more): it answers its log-probabilities, clamped as
    :class:`FromProbabilities` clamps a softmax's, the same logits (up to a constant per row) and top-1 spanning at
    most 69. Read raw, such logits give hard labels at T = 4 and the fine-tuned box's public path fell to chance."""

    def __init__(self, model: nn.Module, spread: float = _SATURATED_SPREAD) -> None:
        super().__init__(model)
        self.spread = spread
        self.why = (f"the teacher's logits span {spread:.3g} an input (past {_SATURATED_SPREAD:.0f}, its soft labels "
                    "at T = 4 are its hard labels): its log-probabilities, clamped at -69 as a final softmax's are, "
                    "are the logits the box learns and serves")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _log_probabilities(torch.softmax(logits_of(self.model(x)), 1))


class FromOneScore(nn.Module):
    """The network of a binary classifier that answers one score per input, the second class's: its logit z, or
    its probability σ(z) (``probability``: a sigmoid at its end). It answers the two logits [0, z], whose softmax
    is [1 − σ(z), σ(z)]: the teacher's own probabilities."""

    def __init__(self, model: nn.Module, probability: bool) -> None:
        super().__init__()
        self.model, self.probability = model, probability
        self.why = ("the teacher answers one probability per input (a sigmoid): its logit and 0 are the two logits "
                    "the box learns and serves" if probability else
                    "the teacher answers one logit z per input: [0, z] are the two logits the box learns and serves")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = logits_of(self.model(x))
        if z.dim() == 1:  # (N,): the score squeezed out of its column
            z = z.unsqueeze(1)
        if self.probability:
            z = _logit(z)
        return torch.cat([torch.zeros_like(z), z], 1)


# Where the inverse of float32's sigmoid is the same function in torch and in ONNX Runtime (the box's export): ONNX
# Runtime's Sigmoid is within about 6e-8 of torch's, which is 6e-4 of p = σ(-9) (and of 1 - p at σ(9)), a logit's
# 1e-3; it answers 0 below about -20. Beyond ±9 the logits of the two differed by up to 0.02 at 12, 52 at 20
# (the export check refused the box); clamped, by at most 1e-3 (a test holds it).
_LOGIT_MAX = 9.0
_P_MIN = 1.0 / (1.0 + math.exp(_LOGIT_MAX))


def _logit(p: torch.Tensor) -> torch.Tensor:
    """The inverse of the sigmoid, within ±9 (:data:`_LOGIT_MAX`): p clamped to [σ(-9), σ(9)], where torch and ONNX
    Runtime invert it alike."""
    p = p.clamp(_P_MIN, 1.0 - _P_MIN)
    return torch.log(p) - torch.log1p(-p)


class FromClassSigmoids(nn.Module):
    """The network of a classifier that answers one sigmoid per class (one-vs-rest heads: every score in [0, 1],
    rows not summing to 1): it answers their logits, logit(p) = log(p / (1 − p)), the scores the sigmoids were
    given (within ±9, :func:`_logit`: the top-1 is the teacher's own unless two classes score beyond 9), and the soft
    labels are those of its logits. (Probabilities taken for logits span at most 1 a row: their soft labels at T = 4
    are near uniform, and teach nothing.)"""

    why = ("the teacher answers one probability per class (a sigmoid on each): their logits are what the box "
           "learns and serves")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logit(logits_of(self.model(x)))


class CopiesInput(nn.Module):
    """The network of a teacher whose forward writes into its input (``x.sub_(mean)``, an ``nn.ReLU(inplace=True)``
    first): it runs on a copy. Else each call would change the owner's data (a batch is often a view of it) and
    the recipe's keyed input would blend the key into what the network left of x, where the exported graph, which
    has no in-place ops, blends it into x itself: the served keyed path would not be the trained one."""

    why = "the teacher changes its input in place (an in-place op on it): it runs on a copy"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.clone())


def plain_teacher(teacher: nn.Module) -> nn.Module:
    """The module a box is made of: a ``torch.compile``'d teacher's original module (a compiled graph neither
    copies into a trainable network nor exports to ONNX; the box is the same function without it), an
    ``nn.DataParallel`` or ``DistributedDataParallel`` one's ``.module`` (the exporter refuses them; a served box
    answers on one device)."""
    while True:
        inner = getattr(teacher, "_orig_mod", None)  # torch._dynamo's OptimizedModule
        if isinstance(teacher, nn.DataParallel | nn.parallel.DistributedDataParallel):
            inner = teacher.module
        if not isinstance(inner, nn.Module):
            return teacher
        teacher = inner


# The hooks a module runs in its forward, by the attribute that holds them (each a dict: id -> hook).
_HOOKS = ("_forward_pre_hooks", "_forward_hooks")
_KEYED = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
# The owner's hook functions that answered None: they observe (capture features, count calls) into the owner's
# objects, and the box's copies run without them (docs/protection.md, the teacher check).
_OBSERVERS: weakref.WeakSet = weakref.WeakSet()


def _observer(hook) -> bool:
    try:
        return hook in _OBSERVERS
    except TypeError:  # not weakly referenceable: never recorded
        return False


class _OwnersHook:
    """A hook of the owner's in a copy: the function itself, closure and all (``copy.deepcopy`` keeps functions by
    reference), so each of its calls is made on the owner's objects. Called once: answering None it only
    observes, and leaves the copy (and is left out of later copies); answering a value it changes the forward
    (clamps its input, say), and the copy keeps it."""

    def __init__(self, hook, hooks: dict, key: int) -> None:
        self.hook, self.hooks, self.key = hook, hooks, key

    def __call__(self, *args, **kwargs):
        answer = self.hook(*args, **kwargs)
        if answer is None:
            with contextlib.suppress(TypeError):
                _OBSERVERS.add(self.hook)
            self.hooks.pop(self.key, None)
        else:
            self.hooks[self.key] = self.hook
        return answer


def _own_hooks(owner: nn.Module, clone: nn.Module) -> None:
    """The copy ``clone`` of ``owner`` without the owner's observing hooks (:class:`_OwnersHook`); its hook objects
    and methods, which ``copy.deepcopy`` copied with it (an old-style ``weight_norm``'s), are its own."""
    for mine, theirs in zip(clone.modules(), owner.modules(), strict=True):
        for kind in _HOOKS:
            hooks, given = getattr(mine, kind, {}), getattr(theirs, kind, {})
            for key, hook in list(hooks.items()):
                if hook is not given.get(key):  # copied with the module: the copy's own
                    continue
                if _observer(hook):
                    del hooks[key]
                    for keyed in _KEYED:
                        getattr(mine, keyed, {}).pop(key, None)
                else:
                    hooks[key] = _OwnersHook(hook, hooks, key)


def dropped_hooks(teacher: nn.Module) -> list[str]:
    """The owner's forward hooks and pre-hooks that the box's copies run without (:class:`_OwnersHook`), named by
    module and function: what a checked wrap logs."""
    return [f"{name or 'the model'}: {getattr(hook, '__qualname__', type(hook).__name__)}"
            for name, m in plain_teacher(teacher).named_modules() for kind in _HOOKS
            for hook in getattr(m, kind, {}).values() if _observer(hook)]


def _copy_script(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A TorchScript module's copy through ``torch.jit.save``/``load``: ``copy.deepcopy`` of one gives parameters
    that are not leaves (nothing can train or freeze them)."""
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    buf.seek(0)
    return torch.jit.load(buf, map_location=device_of(module))


def _deepcopy_memo(teacher: nn.Module) -> dict:
    """What ``copy.deepcopy(teacher, memo)`` takes as already copied: each TorchScript submodule as its
    :func:`_copy_script`, and each plain tensor attribute computed with autograd on (the weight an old-style
    ``weight_norm``/``spectral_norm`` or a ``torch.nn.utils.prune`` hook keeps, after a training step or right after
    ``prune.*``), which ``copy.deepcopy`` refuses, as a detached clone: the hook computes it again on the next forward.
    The owner's modules are only read."""
    memo: dict = {}
    stack = list(teacher.children())
    while stack:
        m = stack.pop()
        if isinstance(m, torch.jit.ScriptModule):  # copied whole, its submodules with it
            memo[id(m)] = _copy_script(m)
            continue
        stack.extend(m.children())
    for m in teacher.modules():
        if isinstance(m, torch.jit.ScriptModule):
            continue
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return memo


def copy_teacher(teacher: nn.Module) -> nn.Module:
    """An independent copy of ``teacher`` (:func:`plain_teacher`) with leaf parameters: a TorchScript module
    (``torch.jit.script``/``trace``), the teacher or one inside it, is copied through ``torch.jit.save``/``load``
    (:func:`_copy_script`); a weight an old-style hook computed with autograd on is copied detached
    (:func:`_deepcopy_memo`). The owner's forward hooks that only observe (answer None) are left out of the copy
    (:class:`_OwnersHook`)."""
    teacher = plain_teacher(teacher)
    if isinstance(teacher, FromSaturatedLogits):  # before its base class, FromProbabilities: its spread kept
        return FromSaturatedLogits(copy_teacher(teacher.model), teacher.spread)
    if isinstance(teacher, Logits | FromProbabilities | FromClassSigmoids | CopiesInput):
        return type(teacher)(copy_teacher(teacher.model))
    if isinstance(teacher, FromOneScore):
        return FromOneScore(copy_teacher(teacher.model), teacher.probability)
    if isinstance(teacher, torch.jit.ScriptModule):
        return _copy_script(teacher)
    clone = copy.deepcopy(teacher, _deepcopy_memo(teacher))
    _own_hooks(teacher, clone)
    return clone


def check_teacher(teacher: nn.Module, data) -> nn.Module:
    """Raise ``ValueError`` unless ``teacher`` is a float32 network that maps a batch of ``data``'s inputs
    (N, *in_shape) to finite float logits (N, num_classes) (``data``: checked by ``DataSplits.checked``).
    It runs a copy (:func:`copy_teacher`: the owner's model, its buffers and its hooks' objects see none of it) on two
    training inputs in eval mode without gradients; then on three, twice and one by one: a forward
    that is random or answers an input by its batch is refused (:func:`~sdb_core.bundle.per_sample_fault`).

    Returns the network a box copies: ``teacher`` (its compiled module's original, :func:`plain_teacher`), inside
    :class:`Logits` when its forward answers the logits as ``out["logits"]`` or ``out.logits``, inside
    :class:`FromProbabilities` when it answers probabilities (an ``nn.Softmax`` at the end: every row in [0, 1],
    summing to 1; the recipe's soft labels at T = 4 read logits, and probabilities taken for logits teach
    nothing), inside :class:`FromClassSigmoids` when it answers one probability per class (every score on up to
    256 training inputs in [0, 1], rows not summing to 1: a sigmoid on each), and inside :class:`FromOneScore`
    when a binary classifier answers one score per input ((N, 1) or (N,)): a probability when every score on up
    to 256 training inputs is in [0, 1] (a trained logit is negative for the first class), else a logit; inside
    :class:`FromSaturatedLogits` when its logits spread past :data:`_SATURATED_SPREAD` on both inputs (soft labels
    at T = 4 that are its hard labels: a last layer scaled up; a TorchScript one is refused, naming the span); inside
    :class:`CopiesInput` when its forward writes into its input. The adapters say what they did in ``why``."""
    teacher = plain_teacher(teacher)
    x = data.train.tensors[0][:2]
    k = data.num_classes
    other = sorted({str(p.dtype) for p in teacher.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if other:  # the box trains, exports (ONNX) and serves in float32, on float32 inputs
        raise ValueError(f"the teacher's parameters are {', '.join(other)}: the box is float32; pass teacher.float()")
    # Probed on a copy: a forward with state (a counter buffer) or the owner's hooks leave the owner's model as it was
    probe = copy_teacher(teacher)
    given = x.to(device_of(teacher))  # on the CPU, a view of the owner's data
    seen = given.clone()
    try:
        with torch.no_grad(), evaluating(probe):
            out = probe(seen)
    except Exception as e:
        raise ValueError(f"the teacher cannot run on this data's inputs (a batch of shape {tuple(x.shape)}): "
                         f"{type(e).__name__}: {e}") from e
    z = logits_of(out)
    if not isinstance(z, torch.Tensor):  # a ValueError like the rest: one exception for "not a classifier of data"
        what = f"a dict with keys {sorted(map(str, out))}" if isinstance(out, dict) else f"a {type(out).__name__}"
        raise ValueError(f"the teacher returns {what}, not a tensor of logits (nor a 'logits' entry or attribute): "  # noqa: TRY004
                         f"wrap a module whose forward returns (N, {k}) logits (e.g. the first element)")
    one_score = z.shape in ((len(x), 1), (len(x),)) and k == 2
    if z.shape != (len(x), k) and not one_score:
        flat = z.dim() > 2 and z[0].numel() == k
        raise ValueError(f"the teacher answers shape {tuple(z.shape)} for {len(x)} inputs; the data has {k} "
                         f"classes: it must answer (N, {k}) logits"
                         + (" (or, for 2 classes, one score per input: (N, 1) or (N,))" if k == 2 else "")
                         + (": flatten its output, e.g. nn.Sequential(teacher, nn.Flatten())" if flat else ""))
    if not z.is_floating_point() or not torch.isfinite(z).all():
        raise ValueError("the teacher's logits must be finite floats (got "
                         f"{z.dtype}{'' if torch.isfinite(z.float()).all() else ' with NaN or Inf'})")
    why = per_sample_fault(probe, [data.train.tensors[0][:3].to(device_of(teacher))], "teacher")
    if why is not None:
        raise ValueError(why)
    net, probed = _logits_module(teacher, z is out), _logits_module(probe, z is out)
    if not torch.equal(seen, given):  # it wrote into its input: from here on it gets copies
        if isinstance(teacher, torch.jit.ScriptModule):
            raise ValueError("the TorchScript teacher changes its input in place (an in-place op on it): script (or "
                             "trace) a module that does not, or pass the nn.Module unscripted")
        net, probed = CopiesInput(net), CopiesInput(probed)
    probabilities = not one_score and bool((z >= 0).all() and (z <= 1).all()
                                           and torch.allclose(z.sum(1), torch.ones(len(z)).to(z), atol=1e-4))
    if (one_score or probabilities) and isinstance(teacher, torch.jit.ScriptModule):  # ONNX's tracer cannot call
        # it from an adapter
        what = f"one score per input for {k} classes" if one_score else "probabilities (each row summing to 1)"
        raise ValueError(f"the TorchScript teacher answers {what}: script (or trace) a module that answers its "
                         f"{k} logits (no final softmax or sigmoid), or pass the nn.Module unscripted")
    sigmoids = not (one_score or probabilities) and bool(((z >= 0) & (z <= 1)).all()) and _scores_are_probabilities(
        probed, data)
    if sigmoids and isinstance(teacher, torch.jit.ScriptModule):
        raise ValueError(f"the TorchScript teacher answers one probability per class (a sigmoid on each): script "
                         f"(or trace) a module that answers its {k} logits, or pass the nn.Module unscripted")
    spread = None if one_score or probabilities or sigmoids else float((z.amax(1) - z.amin(1)).min())
    saturated = spread is not None and spread > _SATURATED_SPREAD
    if saturated and isinstance(teacher, torch.jit.ScriptModule):
        raise ValueError(f"the TorchScript teacher's logits span {spread:.3g} an input (past {_SATURATED_SPREAD:.0f}, "
                         "its soft labels at T = 4 are its hard labels and the box cannot learn from them): pass the "
                         "nn.Module unscripted (its log-probabilities are read), or script one whose logits span less")
    adapted = (FromOneScore(net, _scores_are_probabilities(probed, data)) if one_score
               else FromProbabilities(net) if probabilities else FromClassSigmoids(net) if sigmoids
               else FromSaturatedLogits(net, spread) if saturated else net)
    if adapted is not net and hasattr(net, "why"):  # an ONNX teacher's or CopiesInput's own reading, said first
        adapted.why = f"{net.why}; {adapted.why}"
    return adapted


def _logits_module(teacher: nn.Module, bare: bool) -> nn.Module:
    """``teacher``, inside :class:`Logits` unless its forward answers the tensor itself (``bare``)."""
    if not bare and isinstance(teacher, torch.jit.ScriptModule):  # ONNX's tracer cannot call it from a wrapper
        raise ValueError("the TorchScript teacher answers its logits inside a dict or object: script (or trace) a "
                         "module whose forward returns the logits tensor itself, or pass the nn.Module unscripted")
    return teacher if bare else Logits(teacher)


def _scores_are_probabilities(net: nn.Module, data) -> bool:
    """Whether a teacher's scores are probabilities (a one-score binary teacher's, or one sigmoid per class): every
    score in [0, 1] on up to 256 training inputs (trained logits are negative for the classes an input is not)."""
    with torch.no_grad(), evaluating(net):
        z = torch.cat([net(x.to(device_of(net))) for x in data.train.tensors[0][:256].split(64)])
    return bool(torch.isfinite(z).all() and (z >= 0).all() and (z <= 1).all())


def require_finite_logits(z: torch.Tensor, where: str = "training inputs") -> None:
    """Raise ``ValueError`` unless the frozen teacher's logits ``z`` (N, K) on the recipe's inputs are finite.

    :func:`check_teacher` runs two inputs; a teacher that overflows on others (inputs far from the scale it was
    trained on: raw 0-255 pixels into a network trained on normalised ones) would turn the first loss NaN,
    which reads as a divergence and has the self-check halve a learning rate that is not the cause."""
    bad = int((~torch.isfinite(z).all(1)).sum())
    if bad:
        raise _nonfinite(bad, len(z), where)


def _nonfinite(bad: int, total: int, where: str) -> ValueError:
    return ValueError(f"the teacher's logits are NaN or Inf on {bad} of {total} {where}: the recipe's soft labels "
                      "need finite logits; are the inputs on the scale the teacher was trained on (normalised like "
                      "data.mean and data.std)?")


class FiniteWatch:
    """:func:`require_finite_logits` for teacher logits computed batch by batch inside a training step, without a
    read-back per step (on a GPU each one waits for the device): the count of inputs whose logits are NaN or Inf
    stays on the device until :meth:`check`, which a recipe calls when its loss went NaN (that loss is the
    teacher's fault, said as such, not a divergence) and once at the end."""

    def __init__(self) -> None:
        self.bad: torch.Tensor | None = None
        self.seen = 0

    def add(self, z: torch.Tensor) -> None:
        found = (~torch.isfinite(z).all(1)).sum()
        self.bad = found if self.bad is None else self.bad + found
        self.seen += len(z)

    def check(self) -> None:
        if self.bad is not None and (bad := int(self.bad)):
            raise _nonfinite(bad, self.seen, "inputs of training batches")
