"""The SDK's uploads against a real server: a bundle folder with files beside the bundle's, a dataset whose check
outlasts the client's timeout, what a timed-out upload says, and a folder upload that sends what the local loader
reads."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from PIL import Image
from sdb_client import APITimeoutError, Client

from .conftest import Reply, serve


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundles):  # its own: a deploy here must not add a model to sdb_server's list
    srv, server = serve(tmp_path_factory, bundles, {"digits-b": bundles.b})
    yield server
    srv.stop()


def test_the_sdks_bundle_file_names_are_the_cores():
    """The SDK cannot import sdb_core: its copy of the names must not drift from the one place they come from."""
    from sdb_client._base import BUNDLE_FILES

    from sdb_core.bundle import BUNDLE_FILES as CORE_BUNDLE_FILES

    assert sorted(BUNDLE_FILES) == sorted(CORE_BUNDLE_FILES)


def test_a_bundle_folder_with_other_files_beside_it_deploys_and_serves(server, tmp_path):
    """Every file of the folder was zipped, and the server refused "the archive holds 'NOTES.txt', which is not a
    bundle file", where `sdb models add DIR` serves the same folder."""
    folder = tmp_path / "digits-a"
    shutil.copytree(server.bundles.a, folder)
    (folder / "NOTES.txt").write_text("trained 2026-12-07")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with Client(server.url, server.admin_key) as c:
        version = c.deploy_model(folder, name="with-notes")
        assert version["name"] == "with-notes"
        answer = c.predict("with-notes", server.bundles.x[:2])
        assert len(answer) == 2
        uploaded = c.files.upload(folder, "bundle")
        assert uploaded["format"] == "sdb" and uploaded["info"]["name"] == "digits-a"


def test_an_upload_outlasts_a_short_client_timeout(server, tmp_path):
    """A 99,000-image zip's check took 70 s: the upload raised APITimeoutError at the client's 60 s, while the server
    kept the file (a retry kept a duplicate). The read phase of an upload waits for the check."""
    rng = np.random.default_rng(0)
    for cls in ("zero", "one"):
        (tmp_path / "set" / cls).mkdir(parents=True)
        for i in range(800):  # noise: every image decoded whole by the check takes its time
            Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "set" / cls / f"{i}.png")
    with Client(server.url, server.admin_key, timeout=0.2) as c:
        start = time.monotonic()
        f = c.files.upload(tmp_path / "set", "dataset")
        took = time.monotonic() - start
        assert f["id"].startswith("file-") and f["info"]["images"] == 1600
        assert took > 0.3, f"the upload took {took:.2f} s: not past the client's timeout, so it shows nothing"
        assert [g["id"] for g in c.files.list(all=True)].count(f["id"]) == 1


def test_a_timed_out_upload_says_the_file_may_be_kept_not_to_send_smaller_batches(stub, tmp_path):
    stub.on("POST", "/v1/files", Reply(201, {"id": "file-" + "0" * 24}, delay_s=1.0))
    (tmp_path / "w.safetensors").write_bytes(b"weights")
    with Client(stub.url, "sdb_" + "0" * 12 + "_" + "0" * 64, timeout=0.2) as c, pytest.raises(APITimeoutError) as err:
        c.files.upload(tmp_path / "w.safetensors", "weights", timeout=0.2)
    message = str(err.value)
    assert "while it checked the upload" in message and "files.list()" in message and "batch_size" not in message
    assert stub.hits[("POST", "/v1/files")] == 1  # not resent: the server may have kept it
