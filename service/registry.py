"""Hosted models: verified bundles in ONNX Runtime sessions, added and removed while serving.

The store's ``models`` table is the truth; :meth:`ModelHost.sync` makes memory match it,
so ``sdb models add|remove`` (which writes the store directly) reaches a running server
within ``models_sync_s``, and a restart reloads the same set. A request for a name or a
version the store has and this process has not loaded yet loads it then (one load at a time
per model), so a model another process just deployed answers at once. A bundle that fails
verification is refused before anything changes: running models are never touched. So is one that is not
the bundle registered (its meta.json's digest, recorded by the store: :meth:`ModelHost.load_registered`), and a
version's bundle is looked for where this data dir has it (:func:`service.copies.bundle_path`).
The key opened with the master key lives only in memory, inside the loaded bundle.

Every version the store has is served, but only ``model_cache_mb`` of them (by bundle size) stay loaded
in ONNX Runtime at once (:class:`BundleCache`): a version past it is unloaded when others are used
more recently and loaded again, verified, on its next request. Without the bound every version ever
deployed stayed in memory: a model re-wrapped nightly grew the server without end. A removed version is
never loaded again, not even for a request that held it; one whose file no longer loads answers 503, is
tried again once per ``models_sync_s``, and counts among /readyz's failed versions meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdb_core.bundle import (
    INPUT_NAME,
    LABELLED_TASKS,
    META_FILE,
    OUTPUT_NAME,
    Bundle,
    BundleError,
    available_providers,
    check_class_names,
    load_bundle,
    onnx_providers,
    ort_options,
    ort_out_of_memory,
    output_shape,
)

from .batching import BatcherClosed, Gate, MicroBatcher
from .copies import bundle_path, discard_served
from .disclosure import hide_paths
from .errors import STORE_DOWN, ApiError, not_found, quoted
from .schemas import OutputPolicy
from .settings import Settings
from .statistics import ModelStatistics
from .store import ModelRow, Store, version_key

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


def verify_bundle(path: str | Path, master_key: bytes, session_options=None,
                  providers: list | None = None, verified: str | None = None) -> Bundle:
    """Verify and load; raises ValueError (BundleError, SealError) or OSError when refused.

    ``load_bundle`` checks the hashes, opens the key only beside the network it was sealed with,
    and runs the graph once against ``meta.json``'s output shape; then the output must be what
    the model's task's routes read. What a deploy checks before it registers a bundle, and what
    every server process checks before it serves one. ``providers``: :func:`ort_providers`'s list
    (default: CUDA when there is one, then the CPU). ``verified``: the recorded meta.json digest of a version
    verified before; the same bundle is not run again (:func:`sdb_core.bundle.load_bundle`).
    """
    bundle = load_bundle(path, master_key, session_options=session_options,
                         providers=providers or onnx_providers(), verified=verified)
    check_served_output(bundle.meta, str(path))
    return bundle


# ------------------------------------------------------------ providers, batch sizes, I/O binding
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# The largest micro-batch by a session's first provider (SDB_BATCH_MAX_SAMPLES overrides): on the CPU a
# batch costs in proportion to its size and 64 keeps the tail short; a GPU call costs about the same for
# 1 or 256 small inputs, so it takes more of the queue at once.
BATCH_DEFAULTS = {CUDA: 256, CPU: 64}


def ort_providers(settings: Settings, available: Sequence[str] | None = None) -> list[str | tuple[str, dict]]:
    """The execution providers a model's session asks for, most preferred first, from ``SDB_ORT_PROVIDERS``
    (empty: CUDA when ``available`` has it, then the CPU), in the order asked. A provider ``available`` lacks
    (:func:`sdb_core.bundle.available_providers`) is skipped with one warning, not an error; the CPU
    provider ends the list when it was not asked for. The CUDA provider carries ``SDB_GPU_MEM_LIMIT_MB`` as
    its ``gpu_mem_limit``."""
    if available is None:
        available = available_providers()
    asked = [p.strip() for p in settings.ort_providers.split(",") if p.strip()]
    absent = [p for p in asked if p not in available]
    if absent:
        log.warning("ONNX Runtime providers %s (SDB_ORT_PROVIDERS) are not in this onnxruntime, which has "
                    "%s: falling back to %s", ", ".join(absent), ", ".join(available), CPU)
    chosen = [p for p in dict.fromkeys(asked or [CUDA, CPU]) if p in available]
    chosen += [] if CPU in chosen else [CPU]
    return [(p, cuda_options(settings)) if p == CUDA else p for p in chosen]


def cuda_options(settings: Settings) -> dict[str, str]:
    """The CUDA provider's options: how it picks convolution algorithms (``ort_cudnn_conv_algo_search``), and a
    bound on the GPU memory of each session's arena (one per model)."""
    options = {"cudnn_conv_algo_search": settings.ort_cudnn_conv_algo_search}
    if settings.gpu_mem_limit_mb:
        # Grow by what is asked, not by powers of two, so that the arena stops at the bound, not near it.
        options.update(gpu_mem_limit=str(settings.gpu_mem_limit_mb << 20), arena_extend_strategy="kSameAsRequested")
    return options


def session_provider(bundle: Bundle) -> str:
    """The provider a loaded model runs on: its session's first (ORT drops one that fails to start)."""
    return bundle.session.get_providers()[0]


def batch_samples(settings: Settings, provider: str) -> int:
    """The largest micro-batch for a model on ``provider``: the setting, else the provider's default."""
    return settings.batch_max_samples or BATCH_DEFAULTS.get(provider, BATCH_DEFAULTS[CPU])


def run_bound(session, x: np.ndarray, options=None) -> np.ndarray:
    """One ORT call with its input and output bound to host memory (I/O binding): the batch goes to the
    device in one copy and the output comes back into one host array. What a CUDA session runs."""
    binding = session.io_binding()
    binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(x, dtype=np.float32))
    binding.bind_output(OUTPUT_NAME, "cpu")
    session.run_with_iobinding(binding, options)
    z = binding.copy_outputs_to_cpu()[0]
    return z if z.dtype == np.float32 else z.astype(np.float32)  # a float16 or float64 graph's scores


class RunDeadline:
    """Stops an ONNX Runtime call past ``seconds`` (``RunOptions.terminate``), so that no graph holds a thread of
    the pool every model shares for good (a deploy key's ``Loop`` whose trip count follows the input: four such
    requests took the four threads, and every other tenant's requests waited for ever). One watcher thread looks
    at the calls running (at most one per pool thread) a few times a second; a call costs a RunOptions (~0.3 µs)
    and two dict operations. ``seconds`` 0: no bound. A call the shared CPU arena refused (:func:`shared_cpu_arena`)
    is a :class:`ModelOutOfMemory`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._running: dict[int, tuple[float, object]] = {}  # pool thread → (deadline, its RunOptions)
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self) -> Iterator[object | None]:
        """The RunOptions for one call (None when unbounded); :class:`RunStopped` when it was stopped."""
        options, me = None, threading.get_ident()
        if self.seconds:
            import onnxruntime as ort

            options = ort.RunOptions()
            self._running[me] = (time.monotonic() + self.seconds, options)
            self._watch()
        try:
            yield options
        except Exception as e:
            if options is not None and options.terminate:
                raise RunStopped(self.seconds) from e
            if ort_out_of_memory(e):
                raise ModelOutOfMemory() from None  # ORT's message names allocator internals, not the caller's
            raise
        finally:
            if options is not None:
                self._running.pop(me, None)

    def _watch(self) -> None:
        if self._watcher is None:
            with self._lock:
                if self._watcher is None:
                    self._watcher = threading.Thread(target=self._loop, name="sdb-run-deadline", daemon=True)
                    self._watcher.start()

    def _loop(self) -> None:
        every = min(0.5, self.seconds / 4)
        while True:
            time.sleep(every)
            now = time.monotonic()
            for deadline, options in list(self._running.values()):
                if now > deadline:
                    options.terminate = True  # a call already over ignores it


class RunStopped(ApiError):
    """A model's call ran past SDB_RUN_TIMEOUT_S and was stopped: 503, and its batch is not run again piece by
    piece (each piece would run as long)."""

    retry_alone = False

    def __init__(self, seconds: float):
        super().__init__(503, "model_timeout", f"the model ran past {seconds:g} s on this request (SDB_RUN_TIMEOUT_S) "
                         "and was stopped")


class ModelOutOfMemory(ApiError):
    """A model's call asked for more memory than the served models may hold (SDB_MODEL_MEMORY_MB): 503. A batch is
    run again piece by piece (one sample may fit where the batch did not)."""

    def __init__(self):
        super().__init__(503, "model_out_of_memory", "the model needed more memory for this request than the "
                         "server's models may use (SDB_MODEL_MEMORY_MB); it was refused")


_arena_lock = threading.Lock()
_arena_mb: int | None = None  # the bound of this process's shared CPU arena, once registered


def shared_cpu_arena(mb: int) -> bool:
    """Register, once per process, the ONNX Runtime CPU arena that every served session shares, bounded at ``mb``
    MiB (``SDB_MODEL_MEMORY_MB``); True when sessions should use it (``session.use_env_allocators``).

    What a call allocates (activations, and what the graph builds: a deploy key's ``ConstantOfShape`` of 10^9
    floats, or one whose size follows the input's values) comes from it: past the bound ONNX Runtime refuses the
    allocation and the call fails, where it took the machine's memory and the server with it. Weights are
    apart (the bundle's own size, bounded at upload). The arena keeps what it grew to, up to the bound, for the
    next calls. ONNX Runtime has one such registry per process: the first bound asked stays."""
    global _arena_mb
    if not mb:
        return False
    with _arena_lock:
        if _arena_mb is None:
            import onnxruntime as ort

            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # kSameAsRequested (1): grow by what a call asks, so that the arena stops at the bound, not near it
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"max_mem": mb << 20,
                                                                      "arena_extend_strategy": 1}))
            _arena_mb = mb
        elif _arena_mb != mb:
            log.warning("SDB_MODEL_MEMORY_MB=%d not applied: this process's models already share an arena of %d MiB",
                        mb, _arena_mb)
    return True


def row_policy(row: ModelRow) -> OutputPolicy:
    """A version's output policy as the store has it (validated when it was deployed)."""
    return OutputPolicy.model_construct(policy=row.policy or "probs", top_k=row.top_k, decimals=row.decimals)


def bundle_bytes(path: str | Path) -> int:
    """What a bundle weighs in :class:`BundleCache`: its ``.sdb`` file, or every file of a bundle directory
    (``sdb models add`` registers one in place); 0 when it cannot be read."""
    p = Path(path)
    try:
        if not p.is_dir():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


class BundleCache:
    """The loaded bundles (ONNX Runtime sessions, with the opened key), least recently used first, at most
    ``limit_bytes`` of bundle files (at least one always stays): past it the least recently used is
    dropped, and loaded again with ``load`` (verified, as at deploy) on its next use. A dropped bundle that a
    batch is running keeps its session until that batch ends (the batch holds it).

    Only a served version is loaded again: :meth:`put` marks a version served and :meth:`drop` (its removal
    or replacement) ends that, so a request still holding a removed version gets :class:`BatcherClosed`
    (404 ``model_not_found``, "was removed") and its file is never read again; a load under way when it was
    removed is not kept (it pushed served versions out). A load that fails is not tried again for ``retry_s``:
    the requests meanwhile get the same 503 at once, not a load each (a batch of them ran one load per
    request, each a full verification), and ``on_failure`` tells the host (its ``failed``, in /readyz). A load
    that fails because another process removed the version (its copy deleted with it; ``removed`` asks the
    host, which then stops serving it) is a 404 ``model_not_found``."""

    def __init__(self, limit_bytes: int, load: Callable[[str], Bundle], data_dir: Path, retry_s: float = 1.0,
                 on_failure: Callable[[HostedModel, str | None], None] | None = None,
                 removed: Callable[[HostedModel], bool] | None = None):
        self.limit_bytes, self._load, self.data_dir = limit_bytes, load, data_dir  # data_dir: hidden in messages
        self.retry_s, self.on_failure = retry_s, on_failure  # on_failure(model, why | None: it loads again)
        self.removed = removed
        self._lru: OrderedDict[tuple, tuple[Bundle, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._gates: dict[tuple, threading.Lock] = {}  # one load at a time per version
        self._served: set[tuple] = set()  # the versions that may be loaded again
        self._failed: dict[tuple, tuple[float, str]] = {}  # a failed load: (when, monotonic; the 503's message)
        self.loads = 0  # loads again after a drop (for tests and metrics)

    @staticmethod
    def key(model: HostedModel) -> tuple:
        return model.name, model.version, model.added_at

    def put(self, model: HostedModel, bundle: Bundle) -> None:
        """Keep ``model``'s bundle loaded (most recently used), and serve the version from now on."""
        size = bundle_bytes(model.path)
        with self._lock:
            self._served.add(self.key(model))
            self._keep(self.key(model), bundle, size)

    def _keep(self, key: tuple, bundle: Bundle, size: int) -> None:
        self._lru[key] = (bundle, size)
        self._lru.move_to_end(key)
        total = sum(b for _, b in self._lru.values())
        while total > self.limit_bytes and len(self._lru) > 1:
            _, (_, dropped) = self._lru.popitem(last=False)
            total -= dropped

    def get(self, model: HostedModel) -> Bundle:
        """Blocking (a batch's thread): the model's bundle, loaded again if it was dropped; 503
        ``model_unavailable`` when that load fails (its file gone or changed: the reason, no path);
        :class:`BatcherClosed` when the version is no longer served (removed meanwhile)."""
        key = self.key(model)
        with self._lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                return hit[0]
            self._check_served(model, key)
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                hit = self._lru.get(key)
                if hit is not None:  # another request loaded it meanwhile
                    return hit[0]
                self._check_served(model, key)
            try:
                bundle = self._load(model.path)
                if bundle.meta != model.meta:  # the same file, verified: only a changed one could differ
                    raise ValueError("its bundle changed on disk since it was deployed")
            except (ValueError, OSError) as e:
                if self.removed is not None and self.removed(model):
                    raise not_found(f"model {model.name!r} was removed", "model_not_found") from None
                log.error("model %s version %s cannot be loaded again: %s", model.name, model.version, e)
                message = (f"model {model.name!r} version {model.version!r} cannot be served: "
                           f"{hide_paths(str(e), self.data_dir)}")
                with self._lock:
                    served = key in self._served
                    if served:
                        self._failed[key] = (time.monotonic(), message)
                if served and self.on_failure is not None:
                    self.on_failure(model, str(e))
                raise ApiError(503, "model_unavailable", message) from None
            size = bundle_bytes(model.path)
            with self._lock:
                self._check_served(model, key, retrying=True)  # removed while it loaded: not kept
                self.loads += 1
                failed = self._failed.pop(key, None)
                self._keep(key, bundle, size)
            if failed is not None and self.on_failure is not None:
                self.on_failure(model, None)
            log.info("model %s version %s loaded again", model.name, model.version)
            return bundle

    def _check_served(self, model: HostedModel, key: tuple, retrying: bool = False) -> None:
        """Under the lock: BatcherClosed when the version is no longer served; the last failure's 503 when its
        load failed less than ``retry_s`` ago."""
        if key not in self._served:
            raise BatcherClosed(f"model {model.name!r} version {model.version!r} was removed")
        failed = self._failed.get(key)
        if not retrying and failed is not None and time.monotonic() - failed[0] < self.retry_s:
            raise ApiError(503, "model_unavailable", failed[1])

    def drop(self, model: HostedModel) -> None:
        """The version is no longer served (removed, or replaced by a new row): unload it for good."""
        key = self.key(model)
        with self._lock:
            self._lru.pop(key, None)
            self._gates.pop(key, None)
            self._served.discard(key)
            self._failed.pop(key, None)

    def __contains__(self, model: HostedModel) -> bool:
        return self.key(model) in self._lru

    def __len__(self) -> int:
        return len(self._lru)


# A batcher item's ``keyed`` for one request that asks both paths (v2 infer's probabilities and distill_logits):
# answered as a (public, keyed) pair, counted as one request of its samples (HostedModel.logits, PairedPaths).
BOTH = "both"


@dataclass
class HostedModel:
    name: str
    version: str
    path: str
    added_at: float
    meta: dict  # the bundle's, kept while its session may be unloaded (BundleCache)
    has_key: bool
    bundles: BundleCache = field(repr=False)
    batcher: MicroBatcher = field(repr=False)
    policy: OutputPolicy = field(default_factory=OutputPolicy)  # what the public routes return
    io_binding: bool = False  # run() binds input and output (CUDA sessions only; see run_bound)
    deadline: RunDeadline = field(default_factory=lambda: RunDeadline(0.0), repr=False)  # the host's
    # A tenant's graph (its name owned by a key that is not an admin's): it could compute one sample's answer
    # from another's input, so one caller's requests never share a call with another's.
    isolated: bool = False
    stats: ModelStatistics = field(default_factory=ModelStatistics, repr=False)  # the statistics extension's
    meta_sha256: str | None = None  # of the meta.json it was verified with: loaded again, not run again (_load_again)

    @property
    def bundle(self) -> Bundle:
        """Blocking: the loaded bundle (loaded again from disk when the cache dropped it)."""
        return self.bundles.get(self)

    @property
    def task(self) -> str:
        return self.meta.get("task", "classification")

    @property
    def in_shape(self) -> list[int]:
        return list(self.meta["input"]["shape"])

    @property
    def labels(self) -> list[str]:
        """The bundle's labels; a classifier exported without them is named by its class indices
        (``"0"``, ``"1"``, …) so that predict never answers an empty list."""
        labels = list(self.meta["labels"])
        shape = self.meta.get("output", {}).get("shape")
        if not labels and self.task in LABELLED_TASKS and shape:
            return [str(i) for i in range(int(shape[0]))]
        return labels

    @property
    def num_classes(self) -> int:
        """``len(self.labels)`` without building the list: the inference routes count a model's classes on every
        request (a 50,000-class model's labels were copied for it)."""
        shape = self.meta.get("output", {}).get("shape")
        if not self.meta["labels"] and self.task in LABELLED_TASKS and shape:
            return int(shape[0])
        return len(self.meta["labels"])

    @property
    def distillable(self) -> bool:
        return self.has_key

    def run(self, items: Sequence[tuple[np.ndarray, bool | str]]) -> list[np.ndarray | tuple | ApiError]:
        """Blocking: logits for each (inputs, keyed) item, all in one ORT call; keyed :data:`BOTH`: a (public,
        keyed) pair, its inputs' rows in the call twice (:meth:`logits`)."""
        bundle = self.bundle  # held for the whole batch, whatever the cache drops meanwhile
        t0 = time.perf_counter_ns()  # (after a load the cache may have had to make: not the input's time)
        xs = []
        for one, keyed in items:  # BOTH: its public rows, then its keyed ones
            if keyed is not True:
                xs.append(one)
            if keyed:
                xs.append(bundle.keyed_input(one))
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        t1 = time.perf_counter_ns()
        with self.deadline() as options:
            z = run_bound(bundle.session, x, options) if self.io_binding else bundle.network_logits(x, options)
        t2 = time.perf_counter_ns()
        want = self.meta.get("output", {}).get("shape")
        if z.shape[0] != len(x) or (want is not None and list(z.shape[1:]) != list(want)):
            # A graph whose output's shape follows the input's values passed its one check run: its answer here
            # would be cut or misread (scores of other samples, columns without labels), never served as it is.
            raise ApiError(503, "model_unavailable", f"model {self.name!r} version {self.version!r} answered shape "
                           f"{list(z.shape)} for {len(x)} input(s), where its bundle declares "
                           f"[{len(x)}, {', '.join(map(str, want or []))}]")
        # A request whose inputs, finite but far out of the network's scale (3e38 everywhere), overflowed it fails
        # alone: its NaN, through the public form, read as a valid answer (class 0). One pass over the whole batch.
        finite = np.isfinite(z.reshape(len(z), -1)).all(1)
        out, start, samples = [], 0, 0
        for one, keyed in items:
            n = len(one)
            samples += n
            if keyed is BOTH:  # the request fails when either path does (the keyed path's error first)
                public = self._cut(bundle, z, finite, start, n, False)
                logits = self._cut(bundle, z, finite, start + n, n, True)
                failed = logits if isinstance(logits, ApiError) else public if isinstance(public, ApiError) else None
                out.append((public, logits) if failed is None else failed)
                start += 2 * n
            else:
                out.append(self._cut(bundle, z, finite, start, n, keyed))
                start += n
        # samples: the requests' (a BOTH request's once: the statistics count samples answered, not rows run)
        self.stats.executed(len(items), samples, t1 - t0, t2 - t1, time.perf_counter_ns() - t2)
        return out

    def _cut(self, bundle: Bundle, z: np.ndarray, finite: np.ndarray, start: int, n: int,
             keyed: bool) -> np.ndarray | ApiError:
        """The answer of one path of one request: its ``n`` rows of the call's logits ``z`` from ``start``."""
        bad = n - int(finite[start:start + n].sum())
        if bad:  # the keyed path's scale, or an SDB box's public form
            return ApiError(422, "non_finite_output", f"model {self.name!r} answers NaN or Inf on {bad} of {n} "
                            "input(s): are they on the scale it takes (normalised as its normalize says)?")
        part = z[start:start + n]
        return bundle.keyed_answer(part) if keyed else bundle.public_answer(part)

    def run_feeds(self, items: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Blocking: the output for each item of named inputs, one ORT call each.

        For bundles whose requests cannot share a call: a style request's image has its own size.
        """
        session = self.bundle.session
        out = []
        for feeds in items:
            t0 = time.perf_counter_ns()
            with self.deadline() as options:
                out.append(session.run([OUTPUT_NAME], feeds, options)[0])
            self.stats.executed(1, 1, 0, time.perf_counter_ns() - t0, 0)
        return out

    async def logits(self, x: np.ndarray, keyed: bool | str = False, caller: str | None = None,
                     gate: Gate | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``keyed`` :data:`BOTH`: the (public, keyed) logits of one request that asks both paths, one item of the
        batcher (:class:`PairedPaths`). ``caller`` (a key id, or an address without a key): whom the request is for,
        which an isolated model's batches keep apart; ``gate``: checked beside the model's call, its refusal this
        request's (:meth:`MicroBatcher.submit`)."""
        if keyed and not self.distillable:
            raise ApiError(400, "not_distillable", f"model {self.name!r} has no keyed path ({self.meta['mode']} mode)")
        rows = len(x) if keyed is not BOTH else 2 * len(x)  # the call's rows, which bound its batch
        return await self._answered(self.batcher.submit((x, keyed), rows, caller if self.isolated else None, gate))

    async def outputs(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The output for one request of named inputs (a style bundle's), through the batcher."""
        return await self._answered(self.batcher.submit(feeds, 1))

    async def _answered(self, call: Awaitable[np.ndarray]) -> np.ndarray:
        t0 = time.perf_counter_ns()
        try:
            out = await call
        except Exception:
            self.stats.answered(time.perf_counter_ns() - t0, ok=False)
            raise
        self.stats.answered(time.perf_counter_ns() - t0, ok=True)
        return out

    def describe(self) -> dict:
        m = self.meta
        return {"name": self.name, "version": self.version, "task": self.task,
                "mode": m["mode"], "distillable": self.distillable,
                "input": {"name": m["input"]["name"], "shape": self.in_shape, "dtype": m["input"]["dtype"]},
                "normalize": m["normalize"], "labels": self.labels, "temperature": m.get("temperature"),
                "metrics": m.get("metrics", {}), "protection": protection_report(m.get("check")),
                "output_policy": self.policy.model_dump(), "added_at": self.added_at}


class PairedPaths:
    """A model's two paths for one request that asks both (v2 infer's ``probabilities`` and ``distill_logits``), as
    one item of its batcher: its statistics count one request of ``len(x)`` samples, where the two items it was
    counted two requests and every sample twice. It stands in for the model in
    :func:`service.inference.keyed_logits` and :func:`~service.inference.public_logits`, which check, charge and
    count each path as their own (they read ``name`` and ``logits``): the keyed call submits the item, with its
    gate and caller; the public call waits for its half. A failure of either fails both, so the keyed charge is
    given back for an answer that is never served."""

    def __init__(self, model: HostedModel):
        self.model, self.name = model, model.name
        self._public: asyncio.Future = asyncio.get_running_loop().create_future()

    async def logits(self, x: np.ndarray, keyed: bool = False, caller: str | None = None,
                     gate: Gate | None = None) -> np.ndarray:
        if not keyed:
            return await self._public
        half = self._public  # the public call's: done already when that call was cancelled meanwhile
        try:
            public, z = await self.model.logits(x, BOTH, caller, gate)
        except asyncio.CancelledError:
            half.cancel()
            raise
        except Exception as e:
            if not half.done():
                half.set_exception(e)
            raise
        if not half.done():
            half.set_result(public)
        return z


def protection_report(check: dict | None) -> dict | None:
    """What a caller may see of the wrap's self-check: the verdict, the owner's thresholds and the
    measured figures (held-out data); not the settings tried, which describe the recipe's search."""
    if not check:
        return None
    return {"passed": check["passed"], "thresholds": check["thresholds"], "figures": check["figures"],
            "held_out": check["val_size"]}


def removed_meanwhile(row: ModelRow) -> ApiError:
    """409 ``model_removed``: the version was registered and then removed (``DELETE /v1/models/{name}``) before
    this process served it (:meth:`ModelHost.serve`): it is not served, and its copy went with the removal."""
    return ApiError(409, "model_removed", f"model {quoted(row.name)} version {quoted(row.version)} was registered "
                    f"and then removed (DELETE /v1/models/{row.name}) before it could be served: nothing of it is "
                    "served; deploy it again to serve it")


# The threads every model's ONNX Runtime calls share (ORT releases the GIL: a few let several models run at once).
POOL_THREADS = 4
# The most of them one tenant's models hold at once, all its names and versions together: a key kept four busy
# versions of a slow graph on all four, and every other model's calls waited behind them (seconds). The operator's
# models (an admin's names) are not bounded: their graphs are the operator's own choice.
OWNER_POOL_THREADS = POOL_THREADS - 1


class ModelHost:
    """The models being served, by name and version, each behind its own micro-batcher."""

    def __init__(self, settings: Settings, store: Store,
                 on_batch: Callable[[str, int, int], None] | None = None,
                 on_forget: Callable[[str], None] | None = None):
        self.settings, self.store, self.on_batch = settings, store, on_batch
        self.on_forget = on_forget  # a name deployed no more: what others keep per name goes (the metrics' series)
        self.executor = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="sdb-ort")
        self._owner_slots: dict[str, asyncio.Semaphore] = {}  # a tenant key's id → its share of the pool
        # The keyed requests' charges (a store read), beside their model calls: a stalled store holds these only.
        self.checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sdb-gate")
        self._lock = threading.RLock()
        # name → version → model; replaced whole on change, so readers need no lock.
        self._models: dict[str, dict[str, HostedModel]] = {}
        self.failed: dict[tuple[str, str], str] = {}  # refused at sync: (name, version) → why
        self._failed_seen: dict[tuple[str, str], float] = {}  # added_at of the row that failed
        self._loading: dict[str, threading.Lock] = {}  # one load on demand at a time per model name
        self._loading_guard = threading.Lock()
        self._providers: list | None = None  # ort_providers(settings), decided (and warned about) once
        self.deadline = RunDeadline(settings.run_timeout_s)  # every model's calls, one watcher
        self.bundles = BundleCache(int(settings.model_cache_mb * (1 << 20)), self._load_again, settings.data_dir,
                                   retry_s=settings.models_sync_s, on_failure=self._reload_failed,
                                   removed=self._drop_if_removed)

    # ------------------------------------------------------------ reading
    def loaded(self, name: str, version: str | None = None) -> HostedModel | None:
        """The model in memory (``version`` None: its highest loaded), or None; never the store."""
        versions = self._models.get(name)
        if not versions:
            return None
        return versions[max(versions, key=version_key)] if version is None else versions.get(version)

    def get(self, name: str, version: str | None = None) -> HostedModel:
        """The model, loaded on demand when the store has it and memory not yet (blocking: from a
        coroutine, :meth:`aget`). 404 ``model_not_found``; 503 ``model_unavailable`` with the reason
        when its bundle cannot be loaded. A name already loaded answers its highest loaded version:
        a newer one deployed by another process becomes the default at the next sync."""
        return self.loaded(name, version) or self._load_on_demand(name, version)

    async def aget(self, name: str, version: str | None = None) -> HostedModel:
        """:meth:`get` for the routes: a load on demand runs off the event loop."""
        from starlette.concurrency import run_in_threadpool

        return self.loaded(name, version) or await run_in_threadpool(self._load_on_demand, name, version)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_key)

    def described(self, model: HostedModel) -> dict:
        """What the model routes answer of ``model``: its description and every version of its name served here."""
        return {**model.describe(), "versions": self.versions(model.name)}

    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[HostedModel]:
        models = self._models  # one snapshot: a sync may replace it meanwhile (a name gone: a KeyError, a 500)
        return [m for n in sorted(models) for _, m in sorted(models[n].items(), key=lambda kv: version_key(kv[0]))]

    def failures(self) -> dict[tuple[str, str], str]:
        """A copy of :attr:`failed` (a sync or a load may change it while a caller reads it)."""
        return dict(self.failed)

    def _removed(self, name: str, version: str, added_at: float) -> bool:
        """Blocking: whether the store no longer has this version as added at ``added_at`` (removed, or replaced,
        by any process)."""
        row = self.store.get_model(name, version)
        return row is None or row.added_at != added_at

    def _drop_if_removed(self, model: HostedModel) -> bool:
        """BundleCache's question when a served version no longer loads: whether another process removed it (its
        copy deleted with it). Then this process stops serving it at once, as its next sync would: a request
        without a version goes to the next highest, not to a 404."""
        if not self._removed(model.name, model.version, model.added_at):
            return False
        with self._lock:
            current = self.loaded(model.name, model.version)
            if current is not None and current.added_at == model.added_at:
                self._uninstall(model.name, model.version)
        return True

    def _reload_failed(self, model: HostedModel, why: str | None) -> None:
        """BundleCache's report: a served version that no longer loads (``why``), or loads again (None)."""
        current = self.loaded(model.name, model.version)  # no lock: a sync holds it while it loads
        if current is None or current.added_at != model.added_at:
            return  # removed or replaced meanwhile (an entry left by a race goes at the sync after its removal)
        if why is None:
            self.failed.pop((model.name, model.version), None)
        else:
            self.failed[model.name, model.version] = why

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def owner_slots(self, owner: str | None) -> asyncio.Semaphore | None:
        """The pool threads the models of the tenant key ``owner`` may hold at once, shared by all its models
        (:data:`OWNER_POOL_THREADS`); None (no bound) for None."""
        if owner is None:
            return None
        with self._lock:
            return self._owner_slots.setdefault(owner, asyncio.Semaphore(OWNER_POOL_THREADS))

    # ------------------------------------------------------------ loading (blocking)
    def session_options(self):
        import onnxruntime as ort

        # threads that sleep between calls: spinning ones would steal the core the event loop needs
        so = ort_options(self.settings.ort_intra_op_threads, self.settings.ort_inter_op_threads)
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if shared_cpu_arena(self.settings.model_memory_mb):
            so.add_session_config_entry("session.use_env_allocators", "1")
        return so

    @property
    def providers(self) -> list[str | tuple[str, dict]]:
        """This server's ONNX Runtime providers (:func:`ort_providers`), decided on the first load."""
        if self._providers is None:
            self._providers = ort_providers(self.settings)
        return self._providers

    def load(self, path: str | Path, verified: str | None = None) -> Bundle:
        """:func:`verify_bundle` with this server's session options and providers; ``verified``: a served
        version's recorded meta.json digest (its check run is not repeated)."""
        return verify_bundle(path, self.settings.master_key, self.session_options(), self.providers, verified)

    def _load_again(self, path: str) -> Bundle:
        """BundleCache's load of a served version it dropped: verified with the meta.json digest the version is
        served under, so that the graph, run when it was deployed, is not run again (a tenant's graph ran up to
        MAX_CHECK_RUN_S inside the pool thread of the request that found it dropped)."""
        served = next((m.meta_sha256 for m in self.all() if m.path == path), None)
        return self.load(path, served)

    def path_of(self, row: ModelRow) -> Path:
        """Where this process finds a registered version's bundle (:func:`service.copies.bundle_path`)."""
        return bundle_path(self.settings, row.path)

    def load_registered(self, row: ModelRow) -> Bundle:
        """:meth:`load` of a registered version's bundle, which must be the one registered: BundleError when its
        meta.json's digest is not the one the store recorded (another wrap put in place of an in-place bundle, a
        restore of other files), so that a pinned version never names two networks. A version registered before
        digests has its first load's recorded.

        A version with a recorded digest passed its check run when it was deployed: a bundle with that digest is
        loaded without it (hashes and key checked), so that a server's start and a load on demand take no graph's
        run time (a tenant's four versions of a 13.5 s check run held a start 54 s)."""
        path = self.path_of(row)
        bundle = self.load(path, row.meta_sha256) if row.meta_sha256 else self.load(path)
        digest = bundle.meta_sha256
        recorded = row.meta_sha256 or self.store.record_meta_sha256(row.name, row.version, row.added_at, digest)
        if recorded is not None and recorded != digest:
            raise BundleError(f"the bundle at {path} changed since it was registered: its {META_FILE} is not the one "
                              f"recorded for this version, which would serve another network under it; put the "
                              f"registered bundle back, or remove the version and register this bundle as a new one")
        return bundle

    def _load_on_demand(self, name: str, version: str | None) -> HostedModel:
        row = self.store.get_model(name, version)
        if row is None:
            raise not_found(f"no model named {quoted(name)}" if version is None
                            else f"model {quoted(name)} has no version {quoted(version)}", "model_not_found")
        with self._loading_guard:
            gate = self._loading.setdefault(row.name, threading.Lock())
        with gate:  # one load per model at a time: a second request waits for the first one's
            current = self.loaded(row.name, row.version)
            if current is not None and current.added_at == row.added_at:
                return current
            model = self.serve(row, self._load_row(row))
            if model is None:  # removed meanwhile (by this process or another): not served
                raise not_found(f"model {name!r} was removed", "model_not_found")
            return model

    def _load_row(self, row: ModelRow) -> Bundle:
        """The row's verified bundle; 503 ``model_unavailable`` with the reason (no server path) when it fails,
        and then it is not tried again until the row changes (a sync retries a new row the same way)."""
        key = (row.name, row.version)
        if self._failed_seen.get(key) != row.added_at:
            try:
                return self.load_registered(row)
            except (ValueError, OSError) as e:
                if self._removed(row.name, row.version, row.added_at):  # removed meanwhile: its copy went with it
                    raise not_found(f"model {row.name!r} was removed", "model_not_found") from None
                with self._lock:
                    self.failed[key], self._failed_seen[key] = str(e), row.added_at
                log.error("model %s version %s not served: %s", row.name, row.version, e)
        why = hide_paths(self.failed.get(key, "its bundle failed verification"), self.settings.data_dir)
        raise ApiError(503, "model_unavailable", f"model {row.name!r} version {row.version!r} cannot be served: {why}")

    def _host(self, row: ModelRow, bundle: Bundle) -> HostedModel:
        s = self.settings
        model: HostedModel

        def count(requests: int, samples: int) -> None:
            if self.on_batch is not None:
                self.on_batch(row.name, requests, samples)

        provider = session_provider(bundle)
        if bundle.meta.get("task") == "style":
            # Style images differ in size and cannot share an ORT call: a batch of one each,
            # so no request waits for another's image.
            run, max_samples = (lambda items: model.run_feeds(items)), 1
        else:
            run, max_samples = (lambda items: model.run(items)), batch_samples(s, provider)
        stats = ModelStatistics()
        isolated = self.store.tenant_owned(row.name)
        slots = self.owner_slots(self.store.model_owner(row.name) if isolated else None)
        batcher = MicroBatcher(run, self.executor, max_samples=max_samples, max_wait_s=s.batch_max_wait_ms / 1000.0,
                               enabled=s.batching, on_batch=count, checks=self.checks, on_wait=stats.queued,
                               slots=slots)
        model = HostedModel(row.name, row.version, str(self.path_of(row)), row.added_at, bundle.meta, bundle.has_key,
                            self.bundles, batcher, row_policy(row), io_binding=s.ort_io_binding and provider == CUDA,
                            deadline=self.deadline, isolated=isolated, stats=stats, meta_sha256=bundle.meta_sha256)
        self.bundles.put(model, bundle)
        return model

    def _install(self, model: HostedModel) -> None:
        with self._lock:
            versions = dict(self._models.get(model.name, {}))
            old = versions.get(model.version)
            versions[model.version] = model
            self._models = {**self._models, model.name: versions}
        if old is not None:
            old.batcher.close()
            if old.added_at != model.added_at:
                self.bundles.drop(old)

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
            self.bundles.drop(old)
        if not versions:  # old None too: a removed version this process never served may have been the name's last
            self._name_left(name)

    def _name_left(self, name: str) -> None:
        """No version of ``name`` is served here any more. When the store has none either (removed, by this process
        or another), what is kept per name goes: its load gate and, through :attr:`on_forget`, its metrics' series.
        A version replaced (a new row, installed next) or one this process has not loaded yet keeps the name's.
        A load on demand that raced the removal holds its own gate, and the store refuses it (:meth:`_removed`)."""
        try:
            if self.store.get_model(name) is not None:
                return
        except STORE_DOWN as e:  # the removal is done: kept series are the lesser harm than failing it here
            log.warning("model %s: the store did not say whether its name is still deployed (%s): its metrics' "
                        "series are kept", name, " ".join(str(e).split())[:300])
            return
        with self._loading_guard:
            self._loading.pop(name, None)
        if self.on_forget is not None:
            self.on_forget(name)

    def add(self, path: str | Path, actor: str, *, policy: OutputPolicy | None = None) -> HostedModel:
        """An admin's registration in place (``sdb models add``, the demo): verify the bundle, record it
        under its own name and version, serve it. 400 when refused, 409 when that version is present (or another
        process removed it before it was served: :func:`removed_meanwhile`). Deploys by keys go through
        :mod:`service.deploy` instead (uploads :func:`~service.deploy.serve_bundle`, jobs
        :func:`~service.deploy.deploy_bundle`)."""
        path = str(Path(path).expanduser().resolve())
        try:
            bundle = self.load(path)
            check_class_names(bundle.meta, path)  # a new registration: a registered version loads without it
            digest = bundle.meta_sha256
        except (ValueError, OSError) as e:
            self.store.audit(actor, "model.refused", path, str(e))
            raise ApiError(400, "bundle_refused", f"bundle refused: {e}") from None
        from .deploy import check_policy, check_served_name  # deploy imports this module

        policy = check_policy(policy, bundle.meta)
        name, version = str(bundle.meta["name"]), str(bundle.meta["version"])
        try:  # what a route can name (the deploy route's rule), before anything is recorded
            check_served_name(name, version)
        except ApiError as e:
            self.store.audit(actor, "model.refused", path, e.message)
            raise
        with self._lock:  # one writer at a time: a sync must not load the row this add is writing
            row = self.store.add_model(name, version, path, meta_sha256=digest, **policy.model_dump())
            if row is None:
                raise ApiError(409, "model_exists", f"model {name!r} version {version!r} is already registered")
            self.store.audit(actor, "model.add", f"{name}@{row.version}", path)
            model = self.serve(row, bundle)
            if model is None:  # another process removed it meanwhile
                raise removed_meanwhile(row)
            return model

    def serve(self, row: ModelRow, bundle: Bundle) -> HostedModel | None:
        """Serve a registered row's verified bundle in this process now (a deploy through this server, a load on
        demand); None, and nothing served, when the store no longer has the row (removed or replaced, by any
        process, since it was read): installed after a removal that found nothing loaded to unload (its copy
        deleted), it would serve a removed version. Asked under the lock a removal here holds, so that one of the
        two sees the other. A
        row already served (a sync got to it first) stays as it is: replacing it closed the batcher that requests
        were already holding, and they answered 404 "was removed" for a version being served."""
        with self._lock:
            current = self.loaded(row.name, row.version)
            if current is not None and current.added_at == row.added_at:
                return current
            if self._removed(row.name, row.version, row.added_at):
                return None
            model = self._host(row, bundle)
            self._install(model)
            self.failed.pop((row.name, row.version), None)
            self._failed_seen.pop((row.name, row.version), None)
        log.info("serving model %s version %s on %s", row.name, row.version, session_provider(bundle))
        return model

    def remove(self, name: str, version: str | None, actor: str) -> list[tuple[str, str]]:
        with self._lock:
            return self._remove(name, version, actor)

    def _remove(self, name: str, version: str | None, actor: str) -> list[tuple[str, str]]:
        rows = self.store.remove_model(name, version)
        for r in rows:
            self._uninstall(r.name, r.version)
            self.store.audit(actor, "model.remove", f"{r.name}@{r.version}", str(self.path_of(r)))
            discard_served(self.settings, r.path)  # a deploy's copy; what an admin registered in place stays
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
                bundle = self.load_registered(row)
            except (ValueError, OSError) as e:
                self.failed[key], self._failed_seen[key] = str(e), row.added_at
                log.error("model %s version %s not served: %s", row.name, row.version, e)
                continue
            if self._removed(row.name, row.version, row.added_at):
                continue  # removed (or replaced) while it loaded: the next sync sees what is there now
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
        self.checks.shutdown(wait=False, cancel_futures=True)
