"""``sdb models deploy``, and ``sdb models list|remove`` with ``--url``/``--api-key``: a deploy key serves its
bundles and takes their versions back from the command line, against the real server; without either flag the
same actions stay on the data dir."""
from __future__ import annotations

import json

from sdb_cli.main import main


def test_a_deploy_key_deploys_lists_and_removes_its_model(sdb_server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SDB_API_KEY", raising=False)
    monkeypatch.delenv("SDB_URL", raising=False)
    owner, other = sdb_server.key(("deploy",)), sdb_server.key(("deploy",))
    remote = ["--url", sdb_server.url]
    bundle = str(sdb_server.bundles.b)

    assert main(["models", "deploy", bundle, "--name", "cli-owned", "--policy", "top_k", "--top-k", "2",
                 *remote]) == 2  # no key: refused before any request
    assert "--api-key" in capsys.readouterr().err
    for _ in range(2):
        assert main(["models", "deploy", bundle, "--name", "cli-owned", "--policy", "top_k", "--top-k", "2",
                     *remote, "--api-key", owner]) == 0
    out = capsys.readouterr()
    assert "deployed cli-owned version 1 (output policy top_k=2)" in out.out
    assert "deployed cli-owned version 2" in out.out and owner not in out.out + out.err

    assert main(["models", "list", *remote, "--json"]) == 0  # listing needs no key
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["cli-owned"]["versions"] == ["1", "2"]
    assert main(["models", "list", *remote]) == 0
    assert "cli-owned" in capsys.readouterr().out

    assert main(["models", "remove", "cli-owned", "--version", "1", *remote, "--api-key", other]) == 2
    assert "403" in capsys.readouterr().err  # not its model: nothing removed
    assert main(["models", "remove", "cli-owned", "--version", "1", *remote, "--api-key", owner]) == 0
    assert capsys.readouterr().out.strip() == "removed cli-owned version 1"
    assert main(["models", "list", *remote, "--json"]) == 0
    assert {m["name"]: m for m in json.loads(capsys.readouterr().out)}["cli-owned"]["versions"] == ["2"]

    # without --url or --api-key the action is the data dir's (an empty one here): the server is untouched
    monkeypatch.setenv("SDB_URL", sdb_server.url)
    (tmp_path / "empty").mkdir()  # a data dir that is not there is refused (a typo listed nothing, exit 0)
    assert main(["models", "list", "--json", "--data-dir", str(tmp_path / "empty")]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["models", "remove", "cli-owned", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "no model named 'cli-owned'" in capsys.readouterr().err
    monkeypatch.setenv("SDB_API_KEY", owner)  # the key alone (its env) does not make it remote: --api-key does
    assert main(["models", "remove", "cli-owned", "--api-key", owner]) == 0
    assert capsys.readouterr().out.strip() == "removed cli-owned version 2"
