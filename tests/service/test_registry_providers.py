"""The registry's ONNX Runtime providers, batch sizes and I/O binding, tested on the CPU.

The CUDA provider cannot run here (nor on the device machine, whose onnxruntime is the CPU wheel):
these tests ask for providers that are absent and check the fallback, and stand a CPU session in
for a CUDA one to check what the registry does with a model that runs on CUDA.
"""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sdb_core.bundle import (
    available_providers,
    cuda_visible,
    export_bundle,
    load_bundle,
    onnx_providers,
    use_providers,
)
from service.jobs.worker import run_worker
from service.registry import (
    BATCH_DEFAULTS,
    CPU,
    CUDA,
    ModelHost,
    batch_samples,
    cuda_options,
    ort_providers,
    run_bound,
)
from service.settings import Settings
from service.store import ModelRow, Store

X = np.random.default_rng(0).standard_normal((5, 1, 2, 2)).astype(np.float32)
SEARCH = {"cudnn_conv_algo_search": "HEURISTIC"}  # not ORT's EXHAUSTIVE: a timing of every algorithm a new shape


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    return export_bundle(net, tmp_path_factory.mktemp("providers") / "tiny.sdb", name="tiny",
                         in_shape=(1, 2, 2), mean=(0.0,), std=(1.0,), labels=["a", "b", "c"])


def settings(tmp_path, **over) -> Settings:
    return Settings(data_dir=tmp_path / "data", **over)


def serving_host(tmp_path, **over) -> ModelHost:
    """A ModelHost on its own store, as a server's (the store says whose models are whose)."""
    s = settings(tmp_path, **over)
    s.data_dir.mkdir(parents=True, exist_ok=True)
    return ModelHost(s, Store(s.db_url))


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sdb.service" and r.levelno >= logging.WARNING]


def test_an_absent_provider_falls_back_to_the_cpu_with_one_warning(tmp_path, caplog):
    s = settings(tmp_path, ort_providers="CUDAExecutionProvider, TensorrtExecutionProvider")
    with caplog.at_level(logging.WARNING, logger="sdb.service"):
        assert ort_providers(s, available=[CPU]) == [CPU]
    (w,) = warnings_of(caplog)
    assert w.levelno == logging.WARNING  # a warning, not an error: the server serves on the CPU
    assert "CUDAExecutionProvider, TensorrtExecutionProvider" in w.getMessage() and CPU in w.getMessage()


def test_providers_default_to_cuda_then_cpu_and_keep_the_order_asked(tmp_path, caplog):
    both = [CUDA, CPU]
    with caplog.at_level(logging.WARNING, logger="sdb.service"):
        assert ort_providers(settings(tmp_path), available=both) == [(CUDA, SEARCH), CPU]
        assert ort_providers(settings(tmp_path), available=[CPU]) == [CPU]  # the CPU wheel: no warning
        assert ort_providers(settings(tmp_path, ort_providers=CPU), available=both) == [CPU]  # CPU forced
        # As asked (ORT gives each node to the first provider that takes it); the CPU always ends the list.
        cpu_first = settings(tmp_path, ort_providers=f"{CPU},{CUDA}")
        assert ort_providers(cpu_first, available=both) == [CPU, (CUDA, SEARCH)]
        assert ort_providers(settings(tmp_path, ort_providers=CUDA), available=both) == [(CUDA, SEARCH), CPU]
    assert warnings_of(caplog) == []


@pytest.mark.parametrize(("visible", "cuda"), [(None, True), ("0", True), ("1,0", True), ("", False), ("-1", False),
                                              (" , ", False)])
def test_a_process_whose_devices_are_hidden_asks_for_no_gpu_provider(tmp_path, monkeypatch, caplog, visible, cuda):
    """onnxruntime-gpu lists CUDA whatever CUDA_VISIBLE_DEVICES says; the job workers past the GPUs (which the
    service gives "") asked for it, and each session logged an error before it fell back to the CPU."""
    gpu_wheel = ["TensorrtExecutionProvider", CUDA, CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(gpu_wheel))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert (cuda_visible() is None) == (visible is None)
    assert available_providers() == (gpu_wheel if cuda else [CPU])
    use_providers(None)
    assert onnx_providers() == ([CUDA, CPU] if cuda else [CPU])
    with caplog.at_level(logging.WARNING, logger="sdb.service"):
        assert ort_providers(settings(tmp_path)) == ([(CUDA, SEARCH), CPU] if cuda else [CPU])
    assert warnings_of(caplog) == []  # the default asks for none of them: nothing to warn of


def test_the_cuda_provider_carries_the_gpu_memory_limit_and_the_algorithm_search(tmp_path):
    s = settings(tmp_path, gpu_mem_limit_mb=512)
    want = {**SEARCH, "gpu_mem_limit": str(512 * 1024 * 1024), "arena_extend_strategy": "kSameAsRequested"}
    assert cuda_options(s) == want
    assert ort_providers(s, available=[CUDA, CPU]) == [(CUDA, want), CPU]
    assert cuda_options(settings(tmp_path)) == SEARCH  # 0: ONNX Runtime's own default, no bound
    assert cuda_options(settings(tmp_path, ort_cudnn_conv_algo_search="EXHAUSTIVE")) == {
        "cudnn_conv_algo_search": "EXHAUSTIVE"}
    for bad in ({"gpu_mem_limit_mb": -1}, {"ort_cudnn_conv_algo_search": "fastest"}):
        with pytest.raises(ValueError):
            settings(tmp_path, **bad)


def test_batch_size_defaults_by_provider_and_the_setting_overrides_it(tmp_path):
    assert BATCH_DEFAULTS == {CUDA: 256, CPU: 64}
    assert batch_samples(settings(tmp_path), CUDA) == 256
    assert batch_samples(settings(tmp_path), CPU) == 64
    assert batch_samples(settings(tmp_path), "OpenVINOExecutionProvider") == 64  # any other: the CPU's
    for provider in (CUDA, CPU):
        assert batch_samples(settings(tmp_path, batch_max_samples=16), provider) == 16


def test_a_cpu_model_is_batched_for_the_cpu_and_never_binds(tmp_path, plain_bundle, caplog, monkeypatch):
    # Asked for CUDA and a provider no onnxruntime has: served, on CUDA only where this onnxruntime has it.
    host = serving_host(tmp_path, ort_providers="CUDAExecutionProvider,NoSuchExecutionProvider")
    try:
        with caplog.at_level(logging.WARNING, logger="sdb.service"):
            a, _ = host.load(plain_bundle), host.load(plain_bundle)
        assert len(warnings_of(caplog)) == 1  # decided once per server, not per model
        has_cuda = CUDA in ort.get_available_providers()
        assert a.session.get_providers() == ([CUDA, CPU] if has_cuda else [CPU])
    finally:
        host.close()
    # Only a provider no onnxruntime has: the CPU on every machine, batched for it and never bound.
    host = serving_host(tmp_path, ort_providers="NoSuchExecutionProvider")
    try:
        b = host.load(plain_bundle)
        assert b.session.get_providers() == [CPU]
        model = host._host(ModelRow(name="tiny", version="1", path=str(plain_bundle), added_at=0.0), b)
        assert model.batcher.max_samples == 64 and not model.io_binding
        monkeypatch.setattr(type(model.bundle.session), "io_binding",
                            lambda *a: pytest.fail("the CPU path took I/O binding"), raising=False)
        (z,) = model.run([(X, False)])
        np.testing.assert_allclose(z, b.public_logits(X), rtol=1e-6)
    finally:
        host.close()


class CudaLooking:
    """A CPU session that says it runs on CUDA (what the registry reads), counting its I/O bindings."""

    def __init__(self, session):
        self.session, self.bindings = session, 0

    def get_providers(self) -> list[str]:
        return [CUDA, CPU]

    def io_binding(self):
        self.bindings += 1
        return self.session.io_binding()

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_a_cuda_model_gets_large_batches_and_one_bound_call_per_batch(tmp_path, plain_bundle):
    host = serving_host(tmp_path, ort_providers=CPU)
    try:
        bundle = host.load(plain_bundle)
        cpu_logits = bundle.public_logits(np.concatenate([X, X[:2]]))
        bundle.session = CudaLooking(bundle.session)
        model = host._host(ModelRow(name="tiny", version="1", path=str(plain_bundle), added_at=0.0), bundle)
        assert model.batcher.max_samples == 256 and model.io_binding
        z1, z2 = model.run([(X, False), (X[:2], False)])  # two requests, one batch: one bound call
        assert bundle.session.bindings == 1
        np.testing.assert_allclose(np.concatenate([z1, z2]), cpu_logits, rtol=1e-6)
        off = serving_host(tmp_path, ort_providers=CPU, ort_io_binding=False)
        try:
            assert not off._host(ModelRow(name="tiny", version="1", path="", added_at=0.0), bundle).io_binding
        finally:
            off.close()
    finally:
        host.close()


def test_run_bound_gives_what_run_gives(tmp_path, plain_bundle):
    host = serving_host(tmp_path, ort_providers=CPU)
    try:
        bundle = host.load(plain_bundle)
        np.testing.assert_allclose(run_bound(bundle.session, X.astype(np.float64)), bundle.public_logits(X),
                                   rtol=1e-6)
    finally:
        host.close()


@pytest.fixture
def process_providers():
    yield
    use_providers(None)  # this process's own choice again, for the tests after


def test_a_job_worker_opens_bundles_on_the_providers_its_settings_name(tmp_path, plain_bundle, process_providers):
    # A job's sessions (a distillation's teacher bundle, an audited one) take SDB_ORT_PROVIDERS as the server's
    # do. CUDA cannot run here; the CPU wheel's other provider (Azure) shows the setting reaching the session.
    other = "AzureExecutionProvider"
    assert other in ort.get_available_providers(), "this onnxruntime wheel lacks the provider the test names"
    assert load_bundle(plain_bundle).session.get_providers() == [CPU]  # the default: no CUDA here, the CPU
    s = settings(tmp_path, ort_providers=other)
    run_worker(s, once=True)  # an empty queue: it prepares its process and stops
    assert onnx_providers() == ort_providers(s) == [other, CPU]
    assert load_bundle(plain_bundle).session.get_providers() == [other, CPU]
    assert load_bundle(plain_bundle, providers=[CPU]).session.get_providers() == [CPU]  # asked for: as asked
