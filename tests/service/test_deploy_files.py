"""The deployment files cannot drift from the code: there is no Docker engine here, so the
Dockerfile, docker-compose.yml (with its GPU override and deploy/scale.env) are parsed and every
command, flag, setting, port, secret and health check they use is checked against the CLI
parser, the Settings class, the app's routes and Ray's own CLI. hadolint lints the Dockerfile."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy.engine import make_url

from sdb_cli.main import build_parser
from service.settings import Settings

from .conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
GPU = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
SCALE_ENV = dict(line.split("=", 1) for line in (ROOT / "deploy/scale.env").read_text().splitlines()
                 if line and not line.startswith("#"))
SERVICES = COMPOSE["services"]
SDB_SERVICES = [n for n, s in SERVICES.items() if s.get("image", "").startswith("sdb")]
VENV_BIN = ROOT / ".venv" / "bin"


# ----------------------------------------------------------------------------- parsing helpers
def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments)]}, continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    logical = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        logical += line
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        op, _, rest = logical.partition(" ")
        logical = ""
        if op.upper() == "FROM":
            m = re.fullmatch(r"\S+(?:\s+AS\s+(\S+))?", rest.strip(), flags=re.IGNORECASE)
            assert m and m.group(1), f"every stage is named: FROM {rest}"
            current = stages.setdefault(m.group(1), [])
        current.append((op.upper(), rest.strip()))
    return stages


STAGES = dockerfile_stages()
FINAL = ("cpu", "gpu")  # the two images a user builds: the default target and --target gpu


def one(stage: str, op: str) -> str:
    found = [a for o, a in STAGES[stage] if o == op]
    assert len(found) == 1, (stage, op, found)
    return found[0]


def env_of(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in STAGES[stage]:
        if op == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(args))
    return env


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR:-default} and ${VAR}, from ``env`` (the shell or an --env-file)."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), value)


def argv(service: dict) -> list[str]:
    return [*service.get("entrypoint", [])[1:], *service["command"]] if "entrypoint" in service \
        else list(service["command"])


# ----------------------------------------------------------------------------- the Dockerfile
def test_dockerfile_images_run_sdb_serve_as_non_root_with_the_data_volume():
    assert set(FINAL) <= set(STAGES) and list(STAGES)[-1] == "cpu"  # the default target is the CPU image
    assert "--target gpu" in (ROOT / "Dockerfile").read_text()  # the one documented switch
    default = Settings.model_fields
    for stage in FINAL:
        entry, cmd = json.loads(one(stage, "ENTRYPOINT")), json.loads(one(stage, "CMD"))
        assert entry == ["sdb"]
        args = build_parser().parse_args(cmd)  # SystemExit on an unknown command or flag
        assert args.command == "serve"
        user = one(stage, "USER").split(":")[0]
        assert user not in ("root", "0") and user.isdigit()
        env = env_of(stage)
        # the data and, apart from it (jobs read the data dir), the secrets made when none are mounted
        secrets_dir = Settings(data_dir=env["SDB_DATA_DIR"]).secrets_path
        assert set(json.loads(one(stage, "VOLUME"))) == {env["SDB_DATA_DIR"], secrets_dir.as_posix()}
        assert not secrets_dir.is_relative_to(env["SDB_DATA_DIR"])
        assert f"chmod 700 {secrets_dir}" in " ".join(a for o, a in STAGES[stage] if o == "RUN")
        assert one(stage, "EXPOSE") == str(default["port"].default)
        assert env["SDB_HOST"] == "0.0.0.0"  # reachable from outside the container
        for name, value in env.items():
            if name.startswith("SDB_"):
                assert name[4:].lower() in default, f"{stage}: {name} is not a setting"
                Settings(**{name[4:].lower(): value})  # and its value validates
    for stage in ("build", "gpu-build"):  # the lock, then the project without its dependencies
        runs = " ".join(a for o, a in STAGES[stage] if o == "RUN")
        assert "-r requirements.lock" in runs or "requirements-gpu.lock" in runs
        assert "--no-deps ." in runs
    assert "onnxruntime-gpu" in " ".join(a for o, a in STAGES["gpu-build"] if o == "RUN")
    assert one("gpu-base", "FROM").split()[0] == "${CUDA_IMAGE}"
    assert "nvidia/cuda:" in (ROOT / "Dockerfile").read_text() and "-runtime-" in (ROOT / "Dockerfile").read_text()


def test_healthcheck_is_served_and_passes_against_a_running_server(tmp_path, server_factory):
    from service.app import build_app

    paths = build_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    server = server_factory(tmp_path / "data")
    for stage in FINAL:
        spec = one(stage, "HEALTHCHECK")
        cmd = json.loads(spec[spec.index("CMD") + 3:].strip())
        assert cmd[:2] == ["python", "-c"]
        path = re.search(r"'(/[a-z]+)'", cmd[2]).group(1)
        assert "get" in paths[path]
        assert "SDB_PORT" in cmd[2] and f"'{Settings.model_fields['port'].default}'" in cmd[2]
        # the image's own check, run as Docker runs it, against a live `sdb serve`
        ok = subprocess.run([str(VENV_BIN / "python"), "-c", cmd[2]], env={"SDB_PORT": str(server.port)},
                            capture_output=True, timeout=30, check=False)
        assert ok.returncode == 0, ok.stderr
    server.stop()
    down = subprocess.run([str(VENV_BIN / "python"), "-c", cmd[2]], env={"SDB_PORT": str(server.port)},
                          capture_output=True, timeout=30, check=False)
    assert down.returncode != 0  # and it fails when the server is gone


def test_hadolint_passes():
    r = subprocess.run([str(VENV_BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_lock_pins_every_requirement_within_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    pins = {canonicalize_name(n): v for n, v in (line.split("==") for line in
            (ROOT / "requirements.lock").read_text().splitlines() if line and not line.startswith("#"))}
    wanted = [*project["dependencies"], *client["dependencies"], *project["optional-dependencies"]["postgres"],
              *project["optional-dependencies"]["ray"]]
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "safe-distillation-box-client":  # the CLI's SDK, from clients/python in the same tree
            continue
        assert name in pins, f"{req.name} is not in requirements.lock: make lock"
        assert req.specifier.contains(pins[name], prereleases=True), (line, pins[name])
    assert "safe-distillation-box" not in pins and "safe-distillation-box-client" not in pins  # the project comes from the source tree
    assert project["optional-dependencies"]["postgres"] == ["psycopg[binary]==3.3.9"]


def test_nothing_secret_enters_the_image():
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"  # everything is left out of the build context unless listed
    allowed = {p.lstrip("!").rstrip("/") for p in ignore if p.startswith("!")}
    assert not any(p.startswith(("secrets", ".sdb", ".venv", ".git")) for p in allowed)
    text = (ROOT / "Dockerfile").read_text()
    copied = [src for s in STAGES.values() for o, a in s if o == "COPY" and "--from" not in a
              for src in a.split()[:-1]]
    assert all(c.rstrip("/") in allowed for c in copied), copied
    assert not re.search(r"\b[0-9a-f]{32,}\b", text)
    assert not re.search(r"(?i)(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|PEPPER|MASTER_KEY)\b(?!_FILE)", text)



def test_every_package_the_wheel_and_its_command_need_is_copied_into_each_build():
    """The images ran ``sdb`` without ``sdb_cli`` (ModuleNotFoundError at start): the CLI's move to its own package left
    .dockerignore and the COPY lines behind, and setuptools' include pattern then matched nothing, quietly."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()
                and any(re.fullmatch(pat.replace("*", ".*"), p.name) for pat in patterns)}
    assert {"sdb_core", "service", "sdb_cli"} <= packages
    for pat in patterns:  # each pattern names something that exists
        assert any(re.fullmatch(pat.replace("*", ".*"), name) for name in packages), pat
    needed = packages | {script.split(":")[0].split(".")[0] for script in project["project"]["scripts"].values()}
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    allowed = {p.lstrip("!").rstrip("/") for p in ignore if p.startswith("!")}
    assert needed <= allowed, needed - allowed
    builds = [name for name, steps in STAGES.items() if any(o == "RUN" and "pip install --no-deps ." in a
                                                            for o, a in steps)]
    assert sorted(builds) == ["build", "gpu-build"], builds
    for name in builds:
        copied = {src.rstrip("/") for o, a in STAGES[name] if o == "COPY" and "--from" not in a
                  for src in a.split()[:-1]}
        assert needed <= copied, (name, needed - copied)

# ----------------------------------------------------------------------------- docker-compose.yml
@pytest.mark.parametrize("mode", ["one-host", "scale"])
def test_compose_commands_settings_and_ports_exist(mode):
    shell = SCALE_ENV if mode == "scale" else {}
    fields = Settings.model_fields
    for name in SDB_SERVICES:
        svc = SERVICES[name]
        env = {k: interpolate(v, shell) for k, v in svc.get("environment", {}).items()}
        for k in env:
            if k.startswith("SDB_"):
                assert k[4:].lower() in fields, f"{name}: {k} is not a setting"
        settings = Settings(**{k[4:].lower(): v for k, v in env.items() if k.startswith("SDB_")})
        if svc.get("entrypoint", ["sdb"])[0] == "ray":
            continue
        args = build_parser().parse_args(argv(svc))  # SystemExit on an unknown command or flag
        assert args.command in ("serve", "worker"), name
        if args.command == "serve":
            assert args.workers == 0  # jobs run in the worker service or on Ray
            port = args.port or settings.port
            assert port == fields["port"].default
            assert [p.split(":")[-1] for p in svc["ports"]] == [str(port)]
            assert settings.jobs_backend == ("ray" if mode == "scale" else "embedded")
        if mode == "scale":
            url = make_url(settings.database_url)
            assert url.host == "postgres" and url.password is None  # the password comes from a file
            assert url.username == SERVICES["postgres"]["environment"]["POSTGRES_USER"]
            assert url.database == SERVICES["postgres"]["environment"]["POSTGRES_DB"]
        else:
            assert not settings.database_url  # SQLite on the shared volume
        assert {"source": "sdb-data", "target": settings.data_dir.as_posix()} == _volume(svc["volumes"][0])
    assert interpolate(SERVICES["worker"]["deploy"]["replicas"], shell) == ("0" if mode == "scale" else "1")


def test_compose_passes_the_reverse_proxy_settings_to_the_api():
    """Behind a proxy container, the api could neither trust it nor take its prefix: compose passed neither
    SDB_FORWARDED_ALLOW_IPS nor SDB_ROOT_PATH, so every caller was the proxy's address (docs/deploy.md)."""
    env, fields = SERVICES["api"]["environment"], Settings.model_fields
    names = {"SDB_FORWARDED_ALLOW_IPS": "forwarded_allow_ips", "SDB_ROOT_PATH": "root_path"}
    assert {k: interpolate(env.get(k), {}) for k in names} == {k: fields[f].default for k, f in names.items()}
    shell = {"SDB_FORWARDED_ALLOW_IPS": "172.18.0.0/16", "SDB_ROOT_PATH": "/sdb"}
    settings = Settings(**{k[4:].lower(): interpolate(v, shell) for k, v in env.items() if k.startswith("SDB_")})
    assert {k: getattr(settings, f) for k, f in names.items()} == shell


def test_the_docs_nginx_snippets_forward_the_client():
    """docs/deploy.md's nginx prefix snippet sent no X-Forwarded-For: behind it every client was the proxy, one
    rate for all. Each location there that passes to the server (HTTP or gRPC) appends the client."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    snippets = re.findall(r"```nginx\n(.*?)```", text, flags=re.DOTALL)
    locations = re.findall(r"location\s[^{]*\{([^{}]*)\}", "\n".join(snippets))
    passing = {kind: [loc for loc in locations if f"{kind}_pass " in loc] for kind in ("proxy", "grpc")}
    assert passing["proxy"] and passing["grpc"], locations
    for kind, found in passing.items():
        for loc in found:
            assert re.search(rf"{kind}_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for;", loc), loc
    assert "proxy_pass" not in re.sub(r"```nginx\n.*?```", "", text, flags=re.DOTALL)  # none outside the snippets


def test_compose_gives_every_sdb_process_time_to_stop_before_it_kills():
    """Docker kills 10 s after SIGTERM by default: a server still waiting for its requests in flight
    (SDB_SHUTDOWN_TIMEOUT_S) then died before it stopped its job workers (docs/deploy.md#stopping-and-restarting)."""
    fields = Settings.model_fields
    needed = fields["shutdown_drain_s"].default + fields["shutdown_timeout_s"].default + 10
    for name in SDB_SERVICES:
        grace = SERVICES[name].get("stop_grace_period", "10s")
        assert re.fullmatch(r"\d+s", grace) and int(grace[:-1]) >= needed, (name, grace)


def _volume(spec: str) -> dict:
    source, target = spec.split(":")[:2]
    return {"source": source, "target": target}


def test_compose_secrets_are_files_mounted_where_the_settings_read_them():
    declared = COMPOSE["secrets"]
    for name, s in declared.items():
        assert s["file"].startswith("./secrets/")  # git-ignored, docker-ignored, made by `make secrets`
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    makefile = (ROOT / "Makefile").read_text()
    assert all(s["file"][2:] in makefile for s in declared.values())
    for name, svc in SERVICES.items():
        mounted = set(svc.get("secrets", []))
        assert mounted <= set(declared), name
        for k, v in svc.get("environment", {}).items():
            if k.endswith(("_FILE", "_PATH")) and str(v).startswith("/run/secrets/"):
                assert v.rsplit("/", 1)[1] in mounted, (name, k)
            # a value that is itself a secret: only file paths and non-secret words allowed
            if re.search(r"PASSWORD|SECRET|TOKEN|PEPPER|MASTER_KEY", k):
                assert k.endswith(("_FILE", "_PATH", "_MODE")), (name, k)
    for text in [(ROOT / p).read_text() for p in ("docker-compose.yml", "docker-compose.gpu.yml", "deploy/scale.env")]:
        assert not re.search(r"\b[0-9a-f]{32,}\b", text)
        assert not re.search(r"://[^/\s:@]+:[^@\s]+@", text)  # no user:password@ in a URL


def test_compose_profiles_and_scaling():
    assert "profiles" not in SERVICES["api"] and "profiles" not in SERVICES["worker"]
    assert "ports" not in SERVICES["worker"] and "container_name" not in SERVICES["worker"]  # --scale worker=N
    assert {n for n, s in SERVICES.items() if "scale" in s.get("profiles", [])} == {"postgres", "ray-head",
                                                                                  "ray-worker"}
    for name in SDB_SERVICES:
        svc = SERVICES[name]
        if name != "api":
            assert svc["healthcheck"] == {"disable": True}  # the image's check is for `sdb serve`
        assert svc["build"] == "." and svc["image"] == "sdb:latest"
    # the GPU variant: the gpu target and the standard device reservation on every SDB service
    assert set(GPU["services"]) == set(SDB_SERVICES)
    for svc in GPU["services"].values():
        assert svc["build"] == {"context": ".", "target": "gpu"} and svc["image"] == "sdb:gpu"
        assert svc["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_ray_nodes_use_flags_ray_has_and_the_api_reaches_the_head():
    help_text = subprocess.run([str(VENV_BIN / "ray"), "start", "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    head, worker = SERVICES["ray-head"], SERVICES["ray-worker"]
    for svc in (head, worker):
        assert svc["entrypoint"] == ["ray"] and svc["command"][0] == "start" and "--block" in svc["command"]
        for flag in svc["command"][1:]:
            assert re.search(rf"^\s+{re.escape(flag.split('=')[0])}\b", help_text, re.MULTILINE), flag
        assert svc["environment"]["RAY_AUTH_MODE"] == "token"
    opts = dict(f.split("=", 1) for f in head["command"] if "=" in f)
    client = urlsplit(SCALE_ENV["SDB_RAY_ADDRESS"])
    assert (client.scheme, client.hostname, str(client.port)) == ("ray", "ray-head", opts["--ray-client-server-port"])
    assert dict(f.split("=", 1) for f in worker["command"] if "=" in f)["--address"] == f"ray-head:{opts['--port']}"


# ----------------------------------------------------------------------------- docs/deploy.md
def readme_deploy_commands() -> list[list[str]]:
    """Every command line of the deploy page's bash blocks (the page is the README's former Deploy section)."""
    section = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    lines = [re.sub(r"\s+#.*$", "", ln).strip() for b in blocks for ln in b.splitlines()]
    # KEY=$(COMMAND | tail -1): the command inside
    lines = [re.sub(r"^\w+=\$\((.*?)\|.*\)$", r"\1", ln) for ln in lines]
    return [shlex.split(ln) for ln in lines if ln]


def test_readme_deploy_commands_name_what_exists():
    """Every command the Deploy section shows: its files, profiles, services and sdb arguments exist."""
    makefile = (ROOT / "Makefile").read_text()
    commands = readme_deploy_commands()
    assert len(commands) >= 10
    for cmd in commands:
        if cmd[0] == "make":
            assert re.search(rf"^{cmd[1]}:", makefile, re.MULTILINE), cmd
        elif cmd[:2] == ["docker", "build"]:
            assert cmd[cmd.index("--target") + 1] in STAGES and cmd[-1] == "."
        elif cmd[:2] == ["docker", "compose"]:
            files = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-f"] or ["docker-compose.yml"]
            services = {}
            for f in files:
                services.update(yaml.safe_load((ROOT / f).read_text())["services"])
            for i, a in enumerate(cmd):
                if a == "--env-file":
                    assert (ROOT / cmd[i + 1]).is_file()
                if a == "--profile":
                    assert any(cmd[i + 1] in s.get("profiles", []) for s in SERVICES.values())
                if a == "--scale":
                    assert cmd[i + 1].split("=")[0] in SERVICES
            if "exec" in cmd:
                rest = cmd[cmd.index("exec") + 1:]
                while rest[0].startswith("-"):
                    rest = rest[2:] if rest[0] == "-e" else rest[1:]
                service, program = rest[0], rest[1:]
                assert service in services, cmd
                if program[0] == "sdb":
                    args = build_parser().parse_args(program[1:])  # SystemExit on an unknown command or flag
                    if program[1:3] == ["jobs", "submit"]:  # and the job's params validate
                        from service.jobs.kinds import get_kind

                        get_kind(args.kind).params.model_validate_json(args.params)
                else:
                    assert program[0] == SERVICES[service]["entrypoint"][0]
        else:
            assert cmd[0] == "curl" and cmd[-1].startswith("localhost:8000/"), cmd


def _copies(tmp_path, n: int, aged: int | None = None):
    """Settings on ``tmp_path/data`` and ``n`` server copies of one model's bundle, the first ``aged`` of them (all
    by default) last written before the sweep's age."""
    import os
    import time

    from service.copies import ORPHAN_AGE_S, copy_new

    settings = Settings(data_dir=tmp_path / "data")
    src = tmp_path / "a.sdb"
    src.write_bytes(b"a bundle's bytes")  # what it holds is not the sweep's business
    made = [copy_new(src, settings.bundles_dir / "k") for _ in range(n)]
    old = time.time() - ORPHAN_AGE_S - 60
    for p in made[:aged]:
        os.utime(p, (old, old))
    return settings, made


def test_a_bundle_copy_a_dead_deploy_left_is_set_aside_at_start(tmp_path, caplog):
    """A server killed between copying a deployed bundle and registering it left the copy for good (after restarts
    and later deploys of the name). A start moves such copies, once an hour old, to bundles/.orphaned/ (never
    deleted: an operator decides) and says so; a registered version's copy, a fresh one (another process's deploy in
    flight) and files that are not copies stay."""
    import logging
    import os
    import time

    from service.copies import ORPHAN_AGE_S, sweep_orphans

    settings, (served, orphan, fresh) = _copies(tmp_path, 3, aged=2)
    mine = served.parent / "notes.sdb"
    mine.write_bytes(b"an admin's")
    old = time.time() - ORPHAN_AGE_S - 60
    os.utime(mine, (old, old))
    with caplog.at_level(logging.WARNING, logger="sdb.service"):
        moved = sweep_orphans(settings, [str(served)])
    assert moved == [settings.bundles_dir / ".orphaned" / "k" / orphan.name]
    assert moved[0].read_bytes() == b"a bundle's bytes" and not orphan.exists()
    assert served.is_file() and fresh.is_file() and mine.is_file()
    assert f"to {settings.bundles_dir / '.orphaned'}" in caplog.text and f"k/{orphan.name}" in caplog.text
    assert sweep_orphans(settings, [str(served)]) == []  # what was set aside is no copy to sweep again


def test_a_copy_the_store_names_at_another_path_is_not_swept(tmp_path):
    """The sweep compared absolute paths: a data dir moved or restored elsewhere (cp -a keeps the mtimes), or
    mounted at another path on another host of the same store, had every served copy deleted at start. A copy is
    named by its place under bundles/."""
    from service.copies import sweep_orphans

    settings, copies = _copies(tmp_path, 2)
    recorded = [f"/elsewhere/data/bundles/k/{p.name}" for p in copies]
    assert sweep_orphans(settings, recorded) == []
    assert all(p.is_file() for p in copies)


def test_a_store_that_may_not_be_this_data_dirs_sweeps_nothing(tmp_path):
    """A new store over an existing data dir (the switch to PostgreSQL), or yesterday's store over today's data dir,
    named none (or not all) of its copies, and the start deleted them for good. A store with no version, or with a
    version whose bundle is missing here, leaves every copy where it is."""
    from service.copies import sweep_orphans

    settings, (served, unnamed) = _copies(tmp_path, 2)
    assert sweep_orphans(settings, []) == []
    assert sweep_orphans(settings, [str(served), str(tmp_path / "gone.sdb")]) == []
    assert served.is_file() and unnamed.is_file()
