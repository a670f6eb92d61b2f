"""Every server and worker on one store shares one data dir: what one writes (a job's artifacts and log, a deployed
bundle) another reads at the same path. Before, only Ray tasks checked it: an ``sdb worker`` on a host with a data
dir of its own ran jobs to "succeeded" whose artifacts and logs the API never saw, and deployed versions that no
server could load. The first process on a store records its data dir's mark; one on another data dir refuses to
start in one line (exit 2), before it claims a job. On SQLite (a file outside both data dirs) and PostgreSQL."""
from __future__ import annotations

import subprocess

import pytest

from service.jobs.queue import JobQueue
from service.jobs.worker import run_worker
from service.settings import DATA_DIR_MARK, Settings, SettingsError
from service.store import Store

from .conftest import SDB, sdb_env
from .jobs_helpers import QUICK

pytestmark = pytest.mark.usefixtures("db_url")

REFUSED = "is not the data dir this store's other processes use"


@pytest.fixture
def first(tmp_path, bundles):
    """The data dir the store's first process recorded, and the store."""
    settings = Settings(data_dir=tmp_path / "host-a", master_key_file=bundles.master_key_file)
    settings.prepare_data_dir()
    store = Store(settings.db_url)
    settings.check_fingerprints(store, pepper=False)
    settings.check_data_dir(store)
    yield settings, store
    store.close()


def test_another_data_dir_is_refused_and_the_recorded_one_kept(first, tmp_path, bundles):
    settings, store = first
    settings.check_data_dir(store)  # the same one again, and a copy of it (a move, a restore) carries its mark
    recorded = store.recorded_secret("data_dir")
    assert recorded == (settings.data_dir / DATA_DIR_MARK).read_text().strip() and len(recorded) == 32
    other = Settings(data_dir=tmp_path / "host-b", master_key_file=bundles.master_key_file)
    other.prepare_data_dir()
    with pytest.raises(SettingsError, match=REFUSED) as refused:
        other.check_data_dir(store)
    # it names the setting and the mark's file, and says how to adopt a data dir that replaces one lost for good
    assert f"SDB_DATA_DIR {other.data_dir}" in str(refused.value)
    assert f"write the store's mark, {recorded}, into {other.data_dir / DATA_DIR_MARK}" in str(refused.value)
    assert store.recorded_secret("data_dir") == recorded  # a refused process changes nothing
    (other.data_dir / DATA_DIR_MARK).write_text(recorded + "\n")
    other.check_data_dir(store)


def test_a_worker_on_another_data_dir_claims_nothing(first, tmp_path, bundles):
    settings, store = first
    job, _ = JobQueue(store).submit("distill", QUICK, "owner")
    other = Settings(data_dir=tmp_path / "host-b", master_key_file=bundles.master_key_file)
    with pytest.raises(SettingsError, match=REFUSED):  # in process, as the pool's workers run
        run_worker(other, once=True)
    done = subprocess.run([SDB, "worker"], env=sdb_env(other.data_dir, bundles), capture_output=True, text=True,
                          timeout=120, check=False)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.startswith("sdb: error: SDB_DATA_DIR") and "\n" not in err, err
    assert REFUSED in err and "Traceback" not in err
    row = JobQueue(store).get(job.id)
    assert (row.status, row.attempts, row.worker) == ("queued", 0, None)
    run_worker(settings, once=True)  # a worker on the store's own data dir takes it (its owner is no key: cancelled)
    assert JobQueue(store).get(job.id).attempts == 1
