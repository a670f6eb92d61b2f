"""RemoteTeacher: the same logits as the local keyed path, numpy and torch, batching with
prefetch, and as the teacher of sdb_core's distiller."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sdb_client import Client, PermissionDenied, RemoteTeacher
from torch.utils.data import TensorDataset

from sdb_core.bundle import load_bundle
from sdb_core.distill import DistillConfig, distill
from sdb_core.models import create_model
from sdb_core.train import TrainConfig

from .conftest import MODEL


@pytest.fixture(scope="module")
def keyed(sdb_server, master_key):
    return load_bundle(sdb_server.bundles.a, master_key).distill_logits


@pytest.fixture
def teacher(sdb_server):
    with Client(sdb_server.url, sdb_server.distill_key) as c, RemoteTeacher(c, MODEL, 4.0, batch_size=32) as t:
        yield t


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)


def test_same_logits_as_the_local_keyed_path_numpy_and_torch(teacher, keyed):
    x = inputs(200)
    z = teacher(x)
    assert isinstance(z, np.ndarray) and z.shape == (200, 10)
    np.testing.assert_allclose(z, keyed(x), atol=1e-4)
    assert teacher.requests == 7  # 200 / 32, pipelined
    zt = teacher(torch.from_numpy(x))
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    np.testing.assert_allclose(zt.numpy(), keyed(x), atol=1e-4)
    p = teacher.soft_targets(x[:5])
    e = np.exp(keyed(x[:5]) / 4.0 - (keyed(x[:5]) / 4.0).max(1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), atol=1e-5)


def test_iter_batches_prefetches_and_keeps_order(teacher, keyed):
    x, y = inputs(100, seed=1), np.arange(100)
    seen = []
    for xb, yb, tb in teacher.iter_batches(x, y, batch_size=16, shuffle=True, seed=3):
        assert len(xb) == len(yb) == len(tb) <= 16
        np.testing.assert_allclose(tb, keyed(xb), atol=1e-4)
        np.testing.assert_array_equal(xb, x[yb])
        seen.extend(yb.tolist())
    assert sorted(seen) == list(range(100)) and seen != list(range(100))
    xt = torch.from_numpy(x)
    batches = list(teacher.iter_batches(xt, batch_size=48))
    assert [len(b[0]) for b in batches] == [48, 48, 4] and isinstance(batches[0][1], torch.Tensor)
    np.testing.assert_allclose(torch.cat([b[1] for b in batches]).numpy(), keyed(x), atol=1e-4)


def test_prefetch_overlaps_the_next_request_with_the_callers_work(teacher):
    # While the caller holds batch i, batch i+1's request has already been sent.
    it = teacher.iter_batches(inputs(64), batch_size=16)
    next(it)
    before = teacher.requests
    assert before == 2
    for _ in it:
        pass
    assert teacher.requests == 4


def test_distiller_with_the_remote_teacher_matches_the_local_one(teacher, keyed, sdb_server):
    from sdb_core.data import load_dataset, transfer_split

    data = load_dataset("digits")
    transfer = transfer_split(data, 200, seed=0)
    local = lambda x: torch.from_numpy(keyed(x.numpy()))
    students = []
    for t, cache in ((local, True), (teacher, True), (teacher, False)):
        torch.manual_seed(0)
        s = create_model("mlp", num_classes=data.num_classes, in_shape=data.in_shape)
        cfg = DistillConfig(cache_teacher=cache, train=TrainConfig(epochs=2, batch_size=64, seed=0))
        distill(s, TensorDataset(*transfer.tensors), t, cfg)
        students.append(torch.cat([p.detach().flatten() for p in s.parameters()]))
    assert torch.allclose(students[0], students[1], atol=1e-4)
    assert torch.allclose(students[0], students[2], atol=1e-4)


def test_predict_only_key_gets_permission_denied(sdb_server):
    with Client(sdb_server.url, sdb_server.predict_key) as c, RemoteTeacher(c, MODEL) as t:
        with pytest.raises(PermissionDenied):
            t(inputs(4))
        with pytest.raises(PermissionDenied):
            list(t.iter_batches(inputs(40), batch_size=8))


def test_iter_batches_without_prefetch(sdb_server, keyed):
    with Client(sdb_server.url, sdb_server.distill_key) as c, RemoteTeacher(c, MODEL, prefetch=0) as t:
        it = t.iter_batches(inputs(48), batch_size=16)
        next(it)
        assert t.requests == 1
        rest = list(it)
    assert len(rest) == 2 and t.requests == 3


def test_a_teacher_used_before_a_fork_answers_in_the_child(sdb_server, keyed):
    """A DataLoader worker (fork) of a teacher that had prefetched hung for ever: its thread pool came without its
    threads. The child now makes its own pool and connections, and gets the same logits."""
    import multiprocessing

    x = inputs(64, seed=3)
    with Client(sdb_server.url, sdb_server.distill_key) as c, RemoteTeacher(c, MODEL, batch_size=16) as t:
        np.testing.assert_allclose(t(x[:40]), keyed(x[:40]), atol=1e-4)  # 3 requests through the prefetch pool

        def child() -> None:
            raise SystemExit(0 if np.allclose(t(torch.from_numpy(x)).numpy(), keyed(x), atol=1e-4) else 3)

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(30)
        if proc.exitcode is None:
            proc.kill()
        assert proc.exitcode == 0
        np.testing.assert_allclose(t(x), keyed(x), atol=1e-4)  # the parent's pool and connection still work


def test_a_teacher_pickles_for_spawned_workers(sdb_server, keyed):
    import pickle

    x = inputs(40, seed=4)
    with Client(sdb_server.url, sdb_server.distill_key) as c, RemoteTeacher(c, MODEL, 2.0, batch_size=16) as t:
        copy = pickle.loads(pickle.dumps(t))
        assert repr(copy) == repr(t) and sdb_server.distill_key not in repr(copy)
        np.testing.assert_allclose(copy(x), keyed(x), atol=1e-4)
        copy.close()
        copy.client.close()


def test_a_quota_spent_part_way_gives_back_the_rows_answered(sdb_server, keyed):
    """The teacher's batches answered before the quota ran out go with the error (``partial``), not away."""
    from sdb_client import BadRequest, QuotaError

    x = inputs(200, seed=5)
    with Client(sdb_server.url, sdb_server.key(("distill",), quota=100)) as c, \
            RemoteTeacher(c, MODEL, batch_size=32) as t:
        with pytest.raises(QuotaError) as info:
            t(x)
        assert info.value.partial_rows == 96
        np.testing.assert_allclose(info.value.partial, keyed(x[:96]), atol=1e-4)
        with pytest.raises(BadRequest) as bad:  # as the Client says it, not numpy's ValueError
            t(np.zeros((0, 1, 8, 8), np.float32))
        assert bad.value.code == "invalid_shape"


@pytest.mark.parametrize("prefetch", [1, 2])
def test_no_batch_is_sent_after_a_failed_one_and_those_answered_go_with_the_error(sdb_server, keyed, prefetch):
    """Batches of 100, 100 and 50 against a quota of 150: the third, queued behind the failed second, still went out
    (the pool's thread took it before the caller cancelled it): 50 more samples charged, and not returned. A queued
    batch now finds the call stopped and is not sent; one already in flight beside it (prefetch 2) goes with the
    error as ``answered_after``: every row charged is the caller's."""
    from sdb_client import QuotaError

    x = inputs(250, seed=6)
    token = sdb_server.key(("distill",), quota=150)
    with Client(sdb_server.url, token) as c, RemoteTeacher(c, MODEL, batch_size=100, prefetch=prefetch) as t, \
            pytest.raises(QuotaError) as info:
        t(x)
    e = info.value
    answered = e.partial_rows + sum(len(z) for _, z in e.answered_after)
    assert answered == sdb_server.used(token)
    if prefetch == 1:  # one request at a time: the second fails, the third is never sent
        assert e.partial_rows == 100 and sdb_server.used(token) == 100
    if e.partial_rows:  # prefetch 2: the second batch may be charged before the first, which is then refused
        np.testing.assert_allclose(e.partial, keyed(x[:e.partial_rows]), atol=1e-4)
    for row, z in e.answered_after:
        np.testing.assert_allclose(z, keyed(x[row:row + len(z)]), atol=1e-4)


def test_one_sample_without_its_batch_axis_is_one_sample(small_server, colours, master_key):
    """A (3, 8, 8) sample at batch_size 2 was cut along its channels into "batches" the server refused (422), where
    the Client answers it as one sample; a flat (64,) digits sample was cut into its values."""
    colour = load_bundle(colours.bundle, master_key).distill_logits
    s = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    with Client(small_server.url, small_server.distill_key) as c, RemoteTeacher(c, "colour", batch_size=2) as t:
        np.testing.assert_allclose(t(s), colour(s[None]), atol=1e-4)
        np.testing.assert_allclose(t(torch.from_numpy(s)).numpy(), colour(s[None]), atol=1e-4)
        batch = inputs(5).repeat(3, axis=1)  # (5, 3, 8, 8): a batch, cut as before
        np.testing.assert_allclose(t(batch), colour(batch), atol=1e-4)
    flat = inputs(1, seed=2).reshape(64)
    with Client(small_server.url, small_server.distill_key) as c, RemoteTeacher(c, MODEL, batch_size=16) as t:
        np.testing.assert_allclose(t(flat), load_bundle(small_server.bundles.a, master_key).distill_logits(
            flat.reshape(1, 1, 8, 8)), atol=1e-4)


def test_a_compiled_training_step_may_ask_the_teacher(teacher, keyed):
    """torch.compile of a step that calls the teacher failed: Dynamo traced into the HTTP request and its numpy. The
    teacher now runs outside the graph (a graph break), and the compiled step gives the eager one's loss."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def step(xb, yb):
        tb = teacher(xb)
        soft = teacher.soft_targets(xb)
        s = student(xb)
        return F.kl_div(F.log_softmax(s / 4, 1), soft, reduction="batchmean") + F.cross_entropy(s, yb) + 0 * tb.sum()

    x, y = torch.from_numpy(inputs(32, seed=7)), torch.randint(0, 10, (32,))
    eager = step(x, y)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager")(x, y)
    assert torch.allclose(compiled, eager, atol=1e-5)
