"""The paths a request takes through a hosted model, shared by the v1, v2 and style routes.

Every model call goes through the model's micro-batcher and is counted here, once: samples
served (metrics) and usage per key. The keyed path is reached only from here, only after the
caller's key was checked for ``distill`` on that model, and its answer leaves only once the key was
charged for the samples (:func:`charge_keyed`). What leaves the public path is decided here too, by the
model version's output policy (:func:`policy_outputs`); the keyed path is not subject to it.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from .auth import ANONYMOUS, ApiKey, Keyring, check_scope, key_store_unavailable
from .batching import BatcherClosed, Gate, GateTimeout
from .errors import ApiError, not_found
from .metrics import Metrics
from .registry import HostedModel
from .schemas import OutputPolicy

log = logging.getLogger("sdb.service")
T = TypeVar("T")


async def _served(call: Awaitable[np.ndarray], model: HostedModel) -> np.ndarray:
    try:
        return await call
    except BatcherClosed:
        raise not_found(f"model {model.name!r} was removed", "model_not_found") from None


def _count(model: HostedModel, route: str, samples: int, key: ApiKey | None, keyring: Keyring,
           metrics: Metrics) -> None:
    """Samples served, for the metrics and for the key's usage (which the write-behind stores)."""
    metrics.count_samples(model.name, route, key.id if key is not None else ANONYMOUS, samples)
    if key is not None:
        keyring.record(key.id, model.name, route, samples)


# Where the tasks that some routes refuse are served: style by a route of its own (its output is an image, not class
# scores), pose and multilabel by predict alone (not distill or v2 infer, which serve classifiers).
TASK_ROUTES = {"style": "POST /v1/style/{name}", "pose": "POST /v1/models/{name}/predict",
               "multilabel": "POST /v1/models/{name}/predict"}


# What predict answers, by task: class scores (softmax), independent labels (a sigmoid each),
# keypoints. distill and v2 infer serve classifiers only.
PREDICT_TASKS = ("classification", "multilabel", "pose")


def require_task(model: HostedModel, tasks: tuple[str, ...] = ("classification",)) -> str:
    """The model's task if it is one of ``tasks``; else a 400 naming the route that serves it, if any."""
    task = model.task
    if task in tasks:
        return task
    where = TASK_ROUTES.get(task)
    hint = f": {where.format(name=model.name)}" if where else f"; this route serves {', '.join(tasks)} models"
    raise ApiError(400, "wrong_task", f"model {model.name!r} is a {task} model{hint}")


# --------------------------------------------------------------------------- the answer's size
# Past this many values an answer is built in a worker thread: softmax, ranking and encoding take time in proportion,
# and on the event loop every other caller (health probes included) waited for them. Below it the thread hop would
# cost more than the work (the demo model's largest answer, 1024 samples x 10 classes, stays on the loop).
OFF_LOOP_VALUES = 1 << 14


def check_answer_size(classes: int, samples: int, outputs: int, max_values: int) -> None:
    """413 ``answer_too_large`` for an answer of more than ``max_values`` values (``SDB_MAX_ANSWER_VALUES``):
    ``samples`` x ``classes`` for each of ``outputs`` (the paths asked: public, keyed, a distill's soft targets),
    checked before any model time is spent; the message says how many samples fit."""
    per_sample = classes * outputs
    if samples * per_sample <= max_values:
        return
    fit = max_values // per_sample
    what = f"{classes} classes" + (f" x {outputs} outputs" if outputs > 1 else "")
    hint = (f"send at most {fit} samples per request" if fit else
            "not one sample of this model fits: the server's operator may raise SDB_MAX_ANSWER_VALUES")
    raise ApiError(413, "answer_too_large", f"the answer to {samples} samples ({what} each) would hold "
                   f"{samples * per_sample:,} values, over this server's bound of {max_values:,} "
                   f"(SDB_MAX_ANSWER_VALUES): {hint}")


async def built(values: int, build: Callable[..., T], *args) -> T:
    """``build(*args)``, an answer of ``values`` values: in a worker thread past :data:`OFF_LOOP_VALUES`, so that
    the event loop serves other callers meanwhile; on the loop below it."""
    if values <= OFF_LOOP_VALUES:
        return build(*args)
    return await run_in_threadpool(build, *args)


# --------------------------------------------------------------------------- the output policy
def rounded(values: np.ndarray, decimals: int | None) -> np.ndarray:
    """``values`` rounded to ``decimals`` (as float64, so that JSON shows 0.123, not float32's 0.12300000339)."""
    return values if decimals is None else np.round(values.astype(np.float64), decimals)


def policy_outputs(probs: np.ndarray, policy: OutputPolicy) -> tuple[np.ndarray, np.ndarray | None]:
    """What the public path lets out of (N, C) class probabilities: (class indices, their probabilities),
    both (N, k) in decreasing order of probability. ``probs``: every class; ``top_k``: the k highest,
    renormalised to sum to one (the rest is not served at all); ``label``: the predicted class and no
    probability (None). Rounded to ``policy.decimals``. The leak audit's ``apply_policy`` means the same
    (tests/security/test_output_policy_enforced.py checks that :func:`public_view` equals it)."""
    if policy.policy == "label":
        return probs.argmax(axis=1)[:, None], None
    order = np.argsort(-probs, axis=1, kind="stable")
    if policy.policy == "top_k":
        order = order[:, :policy.top_k]
    values = np.take_along_axis(probs, order, axis=1)
    if policy.policy == "top_k":
        values = values / np.maximum(values.sum(axis=1, keepdims=True), 1e-12)
    return order, rounded(values, policy.decimals)


def public_view(probs: np.ndarray, policy: OutputPolicy) -> np.ndarray:
    """:func:`policy_outputs` as the audit's (N, C) tensor: what is not served is zero, a label is one-hot."""
    idx, values = policy_outputs(probs, policy)
    out = np.zeros(probs.shape, dtype=np.float64)
    np.put_along_axis(out, idx, 1.0 if values is None else values, axis=1)
    return out


def class_predictions(probs: np.ndarray, k: int, labels: list[str], policy: OutputPolicy) -> list[dict]:
    """``/predict``'s answer for a classifier: the first ``k`` classes the policy serves, with their scores
    (none under ``label``, which serves one label)."""
    idx, values = policy_outputs(probs, policy)
    idx = idx[:, :k]
    if values is None:
        return [{"labels": [labels[i] for i in row], "indices": row} for row in idx.tolist()]
    return [{"labels": [labels[i] for i in row], "indices": row, "scores": v}
            for row, v in zip(idx.tolist(), values[:, :k].tolist())]


def multilabel_predictions(z: np.ndarray, k: int, labels: list[str], policy: OutputPolicy,
                           threshold: float = 0.5) -> list[dict]:
    """Top-k labels by their own sigmoid probability, and every label at or over ``threshold`` (``present``).
    Under ``top_k`` at most the policy's k labels, and ``present`` only among them; under ``label`` the
    present labels alone, no score."""
    probs = 1.0 / (1.0 + np.exp(-z))
    out = []
    for row in probs:
        present = np.flatnonzero(row >= threshold)
        if policy.policy == "label":
            out.append({"labels": [labels[i] for i in present], "indices": present.tolist()})
            continue
        shown = np.argsort(-row, kind="stable")[:min(k, policy.top_k or k)]
        out.append({"labels": [labels[i] for i in shown], "indices": shown.tolist(),
                    "scores": rounded(row[shown], policy.decimals).tolist(),
                    "present": [labels[i] for i in present if policy.policy == "probs" or i in shown]})
    return out


def require_predict(key: ApiKey | None, model: str | None, public: bool) -> None:
    """``model`` None: the predict scope alone (a listing filters by the key's allowlist itself)."""
    if public:
        return
    if key is None:
        raise ApiError(401, "missing_key", "this server requires an API key for predictions",
                       {"WWW-Authenticate": "Bearer"})
    check_scope(key, "predict", model)


def listable(key: ApiKey | None, public: bool) -> Callable[[str], bool]:
    """Which model names a listing shows this caller (GET /v1/models, the v2 statistics and repository index):
    with ``public_predict`` every one; otherwise the predict scope is needed (401/403 as
    :func:`require_predict`) and the key's allowlist filters."""
    require_predict(key, None, public)
    return (lambda name: True) if public else key.allows_model


async def public_logits(model: HostedModel, x: np.ndarray, key: ApiKey | None, keyring: Keyring,
                        metrics: Metrics, caller: str | None = None) -> np.ndarray:
    """``caller``: :attr:`service.deps.Serving.caller` (an isolated model batches each caller apart)."""
    z = await _served(model.logits(x, keyed=False, caller=caller), model)
    _count(model, "predict", len(x), key, keyring, metrics)
    return z


@dataclass(frozen=True, slots=True)
class KeyedCharge:
    """What :func:`charge_keyed` took: the gate a key without a quota passes beside the model's call, or the window
    the key's quota was charged in (given back if the call then fails: :func:`keyed_logits`)."""

    gate: Gate | None = None
    window: int | None = None


async def charge_keyed(model: HostedModel, samples: int, key: ApiKey, keyring: Keyring) -> KeyedCharge:
    """The keyed path's gate, passed before any model time is spent: the ``distill`` scope for this model and a
    keyed path to serve. A key with a quota is charged in the store now (exactly: 429 before the model runs, and
    before a v2 request's public half). For a key without one the charge is a store read that says the key still
    stands (revoked or expired in another process: 401, and the answer is never given) and a count behind; it is
    returned, to run beside the model's call (:meth:`MicroBatcher.submit`'s gate): one read for the keyed requests
    of a batch and no thread hop of the request's own, which cost ~60 µs of CPU, ~190 µs of latency at one caller,
    and split batches. A store that does not answer in 5 s: 503 ``key_store_unavailable``, the model serves on."""
    check_scope(key, "distill", model.name)
    if not model.distillable:
        task = model.task
        raise ApiError(400, "not_distillable", f"model {model.name!r} has no keyed path "
                       f"({'a ' + task + ' model' if task != 'classification' else 'Nasty mode'})")
    if key.quota is not None:
        return KeyedCharge(window=await asyncio.get_running_loop().run_in_executor(None, keyring.charge, key, samples))
    return KeyedCharge(gate=(keyring.charge_each, (key, samples)))


async def keyed_logits(model: HostedModel, x: np.ndarray, key: ApiKey, keyring: Keyring, metrics: Metrics, *,
                       charge: KeyedCharge | None = None) -> np.ndarray:
    """The keyed logits of ``x``; ``charge``: what :func:`charge_keyed` took for them, when the caller passed it
    already. A call that fails after a quota's charge (the model timed out, ran out of memory, was removed, answered
    NaN) or is cancelled gives the samples back before its error leaves: they were never served."""
    if charge is None:
        charge = await charge_keyed(model, len(x), key, keyring)
    try:
        z = await _served(model.logits(x, keyed=True, caller=key.id, gate=charge.gate), model)
    except GateTimeout:
        raise key_store_unavailable() from None
    except (Exception, asyncio.CancelledError):  # cancelled too (a server shutting down): nothing was served
        if charge.window is not None:  # shielded: a cancelled request's refund still reaches the store
            await asyncio.shield(_refund(keyring, key, len(x), charge.window))
        raise
    _count(model, "distill", len(x), key, keyring, metrics)
    return z


async def _refund(keyring: Keyring, key: ApiKey, samples: int, window: int) -> None:
    try:
        await asyncio.get_running_loop().run_in_executor(None, keyring.refund, key, samples, window)
    except Exception:  # the call's own error is the answer; the samples stay charged
        log.warning("could not give back %d samples to key %s after a failed call", samples, key.id, exc_info=True)


async def stylized(model: HostedModel, feeds: dict[str, np.ndarray], key: ApiKey | None, keyring: Keyring,
                   metrics: Metrics) -> np.ndarray:
    """A style bundle's output for one request's named inputs (the caller checked predict access)."""
    out = await _served(model.outputs(feeds), model)
    _count(model, "style", 1, key, keyring, metrics)
    return out


def pose_predictions(meta: dict, heatmaps: np.ndarray, in_shape: Sequence[int],
                     image_sizes: Sequence[tuple[int, int]] | None = None) -> dict:
    """A pose model's heatmaps as keypoints: (x, y) in input pixels and the peak value per joint; for images sent
    as files (``image_sizes``: each one's width and height), the same points in that image's own pixels too
    (``image_keypoints``), since the image was stretched to the input (pixel centres map onto pixel centres)."""
    from sdb_core.heatmaps import decode

    points, scores = decode(heatmaps, int(meta.get("pose", {}).get("stride", 4)))
    predictions = [{"keypoints": np.round(p, 3).tolist(), "scores": np.round(s, 5).tolist()}
                   for p, s in zip(points, scores)]
    if image_sizes is not None:
        h, w = in_shape[-2:]
        for prediction, p, size in zip(predictions, points, image_sizes, strict=True):
            scale = np.asarray(size, dtype=np.float64) / (w, h)
            prediction["image_keypoints"] = np.round((p + 0.5) * scale - 0.5, 3).tolist()
    return {"joints": list(meta.get("labels", [])), "predictions": predictions}