"""Inference statistics per model version: the Open Inference Protocol's statistics extension, in Triton's form.

Counted where the work happens, for every route that reaches a model (v1 predict and distill, v2 infer over
HTTP and gRPC, style): a request's wait in the model's queue (:class:`~service.batching.MicroBatcher`, until its
ONNX Runtime call starts), each call split into preparing its input, the run and cutting its answers
(:meth:`~service.registry.HostedModel.run`), and each request's outcome, timed from its entry into the queue to
its answer. Nanoseconds and counts, cumulative since the version was loaded (a reload starts again at zero), as
Triton counts them: a call's compute durations count once for each request it served (``inference_stats``) and
once under its batch size, its samples (``batch_stats``); ``inference_count`` is samples, ``execution_count``
calls. There is no response cache: ``cache_hit`` and ``cache_miss`` stay zero. Nothing here names a key or a
caller: the figures are the model's.
"""
from __future__ import annotations

import threading
import time

STAGES = ("compute_input", "compute_infer", "compute_output")
INFER_STATS = ("success", "fail", "queue", *STAGES, "cache_hit", "cache_miss")


class ModelStatistics:
    """One model version's figures; updated from the event loop and ONNX Runtime's threads alike."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._durations = {k: [0, 0] for k in INFER_STATS}  # name -> [count, ns]
        self._batches: dict[int, dict[str, list[int]]] = {}  # batch size -> stage -> [count, ns]
        self.inference_count = self.execution_count = 0
        self.last_inference_ms = 0  # when the last request was answered, in ms since the epoch; 0: never

    def queued(self, waits_ns: list[int]) -> None:
        """The waits of the requests one call is about to serve."""
        with self._lock:
            d = self._durations["queue"]
            d[0] += len(waits_ns)
            d[1] += sum(waits_ns)

    def executed(self, requests: int, samples: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One ONNX Runtime call of ``samples`` samples for ``requests`` requests, its stages' durations."""
        with self._lock:
            self.execution_count += 1
            self.inference_count += samples
            batch = self._batches.setdefault(samples, {k: [0, 0] for k in STAGES})
            for stage, ns in zip(STAGES, (input_ns, infer_ns, output_ns), strict=True):
                d = self._durations[stage]
                d[0] += requests
                d[1] += requests * ns
                batch[stage][0] += 1
                batch[stage][1] += ns

    def answered(self, ns: int, ok: bool) -> None:
        """One request's outcome at the model: answered, or failed (its call failed, its key's quota refused it)."""
        with self._lock:
            d = self._durations["success" if ok else "fail"]
            d[0] += 1
            d[1] += ns
            if ok:
                self.last_inference_ms = time.time_ns() // 1_000_000

    def to_dict(self, name: str, version: str) -> dict:
        """Triton's ``ModelStatistics`` (its HTTP JSON; the gRPC message has the same fields)."""
        def duration(d: list[int]) -> dict:
            return {"count": d[0], "ns": d[1]}

        with self._lock:
            return {"name": name, "version": version, "last_inference": self.last_inference_ms,
                    "inference_count": self.inference_count, "execution_count": self.execution_count,
                    "inference_stats": {k: duration(d) for k, d in self._durations.items()},
                    "batch_stats": [{"batch_size": size, **{k: duration(d) for k, d in stages.items()}}
                                    for size, stages in sorted(self._batches.items())],
                    "memory_usage": []}
