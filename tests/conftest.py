import pytest
import torch

# Two torch threads on a two-core machine collapse (5-50x) whenever anything else runs;
# one thread keeps the suite's timing steady.
torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """One id per fuzzed operation. pytest 9 builds a test's id from its function's name and its parameters;
    schemathesis 4 names each operation's test ``test_x[GET /path]`` with no parameters, so every operation of
    a fuzz test had one id: a failure could not be rerun or selected by it, and pytest-xdist (``make test``)
    ran one operation per id and dropped the rest."""
    for item in items:
        if item.name != item.originalname and not item.nodeid.endswith(f"::{item.name}"):
            if hasattr(item, "_id"):  # pytest 9 keeps the id structured
                item._id = item.parent.id.child(item.name)
            else:
                item._nodeid = f"{item.parent.nodeid}::{item.name}"
