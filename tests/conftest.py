import pytest
import torch

# Two torch threads on a two-core machine collapse (5-50x) whenever anything else runs;
# one thread keeps the suite's timing steady.
torch.set_num_threads(1)


# The files that take longest (`pytest --durations`, 2026-12-08), slowest first. `make test` runs them first: with
# `--dist loadfile` pytest-xdist hands out files in collection order (its own reorder, off in the Makefile, ranks
# them by how many tests they hold, which put these few-test files last), and a long file started last ran alone
# on one worker while the other idled: the suite's last 4% took ~4 minutes of its ~17.
SLOW_FIRST = (
    "tests/core/test_non_image_inputs.py", "tests/core/test_afk.py", "tests/service/test_jobs_workers.py",
    "tests/core/test_quantized_teachers.py", "tests/service/test_serve_stops_cleanly.py",
    "tests/security/test_job_caps_are_enforced_by_the_workers.py", "tests/service/test_jobs_clock_skew.py",
    "tests/core/test_onnx_teachers.py", "tests/core/test_tasks.py", "tests/cli/test_operator_mistakes.py",
    "tests/security/test_secrets_out_of_reach.py", "tests/core/test_check.py",
    "tests/security/test_deploy_ownership.py", "tests/service/test_ray_task_lifecycle.py",
    "tests/browser/test_console.py", "tests/service/test_deploy_ray.py", "tests/service/test_onnx_teachers_api.py",
    "tests/service/test_jobs_api.py", "tests/service/test_bundle_paths.py", "tests/service/test_store_postgres.py",
)


def _slow_first(items) -> None:
    """The slow files first (:data:`SLOW_FIRST`), each file's tests in their own order, the rest as collected."""
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """One id per fuzzed operation. pytest 9 builds a test's id from its function's name and its parameters;
    schemathesis 4 names each operation's test ``test_x[GET /path]`` with no parameters, so every operation of
    a fuzz test had one id: a failure could not be rerun or selected by it, and pytest-xdist (``make test``)
    ran one operation per id and dropped the rest. Then the slow files first (:func:`_slow_first`)."""
    for item in items:
        if item.name != item.originalname and not item.nodeid.endswith(f"::{item.name}"):
            if hasattr(item, "_id"):  # pytest 9 keeps the id structured
                item._id = item.parent.id.child(item.name)
            else:
                item._nodeid = f"{item.parent.nodeid}::{item.name}"
    _slow_first(items)
