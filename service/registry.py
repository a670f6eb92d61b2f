"""Hosted models: verified bundles in ONNX Runtime sessions, added and removed while serving.

The store's ``models`` table is the truth; :meth:`ModelHost.sync` makes memory match it,
so ``sdb models add|remove`` (which writes the store directly) reaches a running server
within ``models_sync_s``, and a restart reloads the same set. A bundle that fails
verification is refused before anything changes: running models are never touched.
The key opened with the master key lives only in memory, inside the loaded bundle.
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdb_core.bundle import OUTPUT_NAME, Bundle, BundleError, load_bundle, onnx_providers, output_shape

from .batching import MicroBatcher
from .errors import ApiError, not_found
from .settings import Settings
from .store import ModelRow, Store

log = logging.getLogger("sdb.service")


# The per-sample output each task's routes read, as (shape, what it means): a score per label, a
# heatmap per joint (decoded to keypoints), an RGB image (encoded as PNG). None: any size there.
# Other tasks are refused by those routes, not at load.
SERVED_OUTPUTS: dict[str, tuple[list[int | None], str]] = {
    "classification": ([None], "one score per label"), "multilabel": ([None], "one score per label"),
    "pose": ([None, None, None], "a heatmap per joint, [joints, h, w]"),
    "style": ([3, None, None], "an RGB image, [3, H, W]"),
}


def check_served_output(meta: dict, where: str) -> None:
    """Refuse a bundle whose (verified) output shape is not what its task's routes read."""
    task = meta.get("task", "classification")
    if task not in SERVED_OUTPUTS:
        return
    want, means = SERVED_OUTPUTS[task]
    shape = output_shape(meta, where)
    if len(shape) != len(want) or any(w is not None and d != w for d, w in zip(shape, want)):
        raise BundleError(f"{where}: a {task} model is served with {means} per input; this one outputs {shape}")


def version_key(v: str) -> tuple:
    """Natural order: "10" after "9", "1.10" after "1.9"."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_]", v))


@dataclass
class HostedModel:
    name: str
    version: str
    path: str
    added_at: float
    bundle: Bundle
    batcher: MicroBatcher = field(repr=False)

    @property
    def meta(self) -> dict:
        return self.bundle.meta

    @property
    def task(self) -> str:
        return self.meta.get("task", "classification")

    @property
    def in_shape(self) -> list[int]:
        return list(self.meta["input"]["shape"])

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def distillable(self) -> bool:
        return self.bundle.has_key

    def run(self, items: Sequence[tuple[np.ndarray, bool]]) -> list[np.ndarray]:
        """Blocking: logits for each (inputs, keyed) item, all in one ORT call."""
        xs = [self.bundle.keyed_input(x) if keyed else x for x, keyed in items]
        z = self.bundle.public_logits(xs[0] if len(xs) == 1 else np.concatenate(xs))
        out, start = [], 0
        for x in xs:
            out.append(z[start:start + len(x)])
            start += len(x)
        return out

    def run_feeds(self, items: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Blocking: the output for each item of named inputs, one ORT call each.

        For bundles whose requests cannot share a call: a style request's image has its own size.
        """
        return [self.bundle.session.run([OUTPUT_NAME], feeds)[0] for feeds in items]

    async def logits(self, x: np.ndarray, keyed: bool = False) -> np.ndarray:
        if keyed and not self.distillable:
            raise ApiError(400, "not_distillable", f"model {self.name!r} has no keyed path ({self.meta['mode']} mode)")
        return await self.batcher.submit((x, keyed), len(x))

    async def outputs(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The output for one request of named inputs (a style bundle's), through the batcher."""
        return await self.batcher.submit(feeds, 1)

    def describe(self) -> dict:
        m = self.meta
        return {"name": self.name, "version": self.version, "task": self.task,
                "mode": m["mode"], "distillable": self.distillable,
                "input": {"name": m["input"]["name"], "shape": self.in_shape, "dtype": m["input"]["dtype"]},
                "normalize": m["normalize"], "labels": self.labels, "temperature": m.get("temperature"),
                "metrics": m.get("metrics", {}), "protection": protection_report(m.get("check")),
                "added_at": self.added_at}


def protection_report(check: dict | None) -> dict | None:
    """What a caller may see of the wrap's self-check: the verdict, the owner's thresholds and the
    measured figures (held-out data); not the settings tried, which describe the recipe's search."""
    if not check:
        return None
    return {"passed": check["passed"], "thresholds": check["thresholds"], "figures": check["figures"],
            "held_out": check["val_size"]}


class ModelHost:
    """The models being served, by name and version, each behind its own micro-batcher."""

    def __init__(self, settings: Settings, store: Store,
                 on_batch: Callable[[str, int, int], None] | None = None):
        self.settings, self.store, self.on_batch = settings, store, on_batch
        # ORT releases the GIL: a few threads let several models run at once.
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sdb-ort")
        self._lock = threading.RLock()
        # name → version → model; replaced whole on change, so readers need no lock.
        self._models: dict[str, dict[str, HostedModel]] = {}
        self.failed: dict[tuple[str, str], str] = {}  # refused at sync: (name, version) → why
        self._failed_seen: dict[tuple[str, str], float] = {}  # added_at of the row that failed

    # ------------------------------------------------------------ reading
    def get(self, name: str, version: str | None = None) -> HostedModel:
        versions = self._models.get(name)
        if not versions:
            raise not_found(f"no model named {name!r}", "model_not_found")
        if version is None:
            return versions[max(versions, key=version_key)]
        if version not in versions:
            raise not_found(f"model {name!r} has no version {version!r}", "model_not_found")
        return versions[version]

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[HostedModel]:
        return [m for n in sorted(self._models) for _, m in sorted(self._models[n].items(),
                                                                    key=lambda kv: version_key(kv[0]))]

    def __contains__(self, name: str) -> bool:
        return name in self._models

    # ------------------------------------------------------------ loading (blocking)
    def session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.settings.ort_intra_op_threads
        so.inter_op_num_threads = self.settings.ort_inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads would steal the core the event loop needs between calls.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return so

    def load(self, path: str) -> Bundle:
        """Verify and load; raises ValueError (BundleError, SealError) or OSError when refused.

        ``load_bundle`` checks the hashes, opens the key only beside the network it was sealed with,
        and runs the graph once against ``meta.json``'s output shape; then the output must be what
        the model's task's routes read.
        """
        bundle = load_bundle(path, self.settings.master_key, session_options=self.session_options(),
                             providers=onnx_providers())
        check_served_output(bundle.meta, path)
        return bundle

    def _host(self, row: ModelRow, bundle: Bundle) -> HostedModel:
        s = self.settings
        model: HostedModel

        def count(requests: int, samples: int) -> None:
            if self.on_batch is not None:
                self.on_batch(row.name, requests, samples)

        if bundle.meta.get("task") == "style":
            # Style images differ in size and cannot share an ORT call: a batch of one each,
            # so no request waits for another's image.
            run, max_samples = (lambda items: model.run_feeds(items)), 1
        else:
            run, max_samples = (lambda items: model.run(items)), s.batch_max_samples
        batcher = MicroBatcher(run, self.executor, max_samples=max_samples, max_wait_s=s.batch_max_wait_ms / 1000.0,
                               enabled=s.batching, on_batch=count)
        model = HostedModel(row.name, row.version, row.path, row.added_at, bundle, batcher)
        return model

    def _install(self, model: HostedModel) -> None:
        with self._lock:
            versions = dict(self._models.get(model.name, {}))
            old = versions.get(model.version)
            versions[model.version] = model
            self._models = {**self._models, model.name: versions}
        if old is not None:
            old.batcher.close()

    def _uninstall(self, name: str, version: str) -> None:
        with self._lock:
            versions = dict(self._models.get(name, {}))
            old = versions.pop(version, None)
            models = dict(self._models)
            if versions:
                models[name] = versions
            else:
                models.pop(name, None)
            self._models = models
        if old is not None:
            old.batcher.close()

    def add(self, path: str | Path, actor: str, *, name: str | None = None, version: str | None = None) -> HostedModel:
        """Verify a bundle, record it in the store, serve it. 400 when refused, 409 when present.
        ``name`` and ``version`` default to the bundle's own (an upload is given the next version)."""
        with self._lock:  # one writer at a time: a sync must not load the row this add is writing
            return self._add(path, actor, name, version)

    def _add(self, path: str | Path, actor: str, name: str | None = None, version: str | None = None) -> HostedModel:
        path = str(Path(path).expanduser().resolve())
        try:
            bundle = self.load(path)
        except (ValueError, OSError) as e:
            self.store.audit(actor, "model.refused", path, str(e))
            raise ApiError(400, "bundle_refused", f"bundle refused: {e}") from None
        name, version = name or str(bundle.meta["name"]), version or str(bundle.meta["version"])
        row = self.store.add_model(name, version, path)
        if row is None:
            raise ApiError(409, "model_exists", f"model {name!r} version {version!r} is already registered")
        self.store.audit(actor, "model.add", f"{name}@{version}", path)
        model = self._host(row, bundle)
        self._install(model)
        log.info("serving model %s version %s from %s", name, version, path)
        return model

    def remove(self, name: str, version: str | None, actor: str) -> list[tuple[str, str]]:
        with self._lock:
            return self._remove(name, version, actor)

    def _remove(self, name: str, version: str | None, actor: str) -> list[tuple[str, str]]:
        rows = self.store.remove_model(name, version)
        for r in rows:
            self._uninstall(r.name, r.version)
            self.store.audit(actor, "model.remove", f"{r.name}@{r.version}", r.path)
        return [(r.name, r.version) for r in rows]

    def sync(self) -> None:
        """Make memory match the store; a row whose bundle fails is logged and skipped."""
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        rows = {(r.name, r.version): r for r in self.store.list_models()}
        for (name, version), m in [((m.name, m.version), m) for m in self.all()]:
            row = rows.get((name, version))
            if row is None or row.added_at != m.added_at:
                self._uninstall(name, version)
        for key, row in rows.items():
            current = self._models.get(row.name, {}).get(row.version)
            if current is not None and current.added_at == row.added_at:
                continue
            if self._failed_seen.get(key) == row.added_at:
                continue  # refused before: a new add (new added_at) tries again
            try:
                bundle = self.load(row.path)
            except (ValueError, OSError) as e:
                self.failed[key], self._failed_seen[key] = str(e), row.added_at
                log.error("model %s version %s not served: %s", row.name, row.version, e)
                continue
            self.failed.pop(key, None)
            self._failed_seen.pop(key, None)
            self._install(self._host(row, bundle))
        for key in [k for k in self.failed if k not in rows]:
            self.failed.pop(key, None)
            self._failed_seen.pop(key, None)

    def close(self) -> None:
        for m in self.all():
            m.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
