"""``sdb jobs submit|status|logs|cancel|delete|list``: a running server's jobs over HTTP, through the SDK."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .console import add_list_flags, err, listed, over_http

TERMINAL = ("succeeded", "failed", "cancelled")


def _params(text: str) -> dict:
    src = text
    if not text.lstrip().startswith("{") and Path(text).is_file():
        src = Path(text).read_text()
    try:
        obj = json.loads(src)
    except json.JSONDecodeError as e:
        if src is text and not text.lstrip().startswith(("{", "[")):  # meant as a file's name, most likely
            raise ValueError(f"--params {text[:200]!r}: no such file, and not a JSON object either") from None
        raise ValueError(f"--params is neither a JSON object nor a JSON file: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("--params must be a JSON object")  # noqa: TRY004  (the CLI reports ValueErrors)
    return obj


def follow(client, job_id: str, poll_s: float = 1.0, out=None) -> dict:
    """Print the log as it grows until the job ends (to ``out``, default the stdout of the call); returns the job."""
    out = out or sys.stdout
    offset = 0
    while True:
        chunk = client.jobs.logs(job_id, offset=offset)
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        offset = chunk.offset
        job = client.jobs.get(job_id)
        if job["status"] in TERMINAL:
            rest = client.jobs.logs(job_id, offset=offset)
            out.write(rest.text)
            out.flush()
            return job
        if not chunk.text:
            time.sleep(poll_s)


def _ended(job: dict) -> int:
    """The exit code of a followed job; one that did not succeed says how it ended on stderr."""
    if job["status"] == "succeeded":
        return 0
    why = job.get("error") or job.get("message") or ""
    err(f"job {job['id']} {job['status']}" + (f": {why}" if why and why != job["status"] else ""))
    return 1


def _download_folder(out: str | None) -> str | None:
    """``--out`` for several artifacts: a folder (one that exists, or ``NAME/``, made by the download), never one
    file that each artifact would overwrite in turn."""
    if out is None or Path(out).is_dir() or out.endswith(("/", os.sep)):
        return out
    raise ValueError(f"--out {out}: several artifacts go into a folder, and {out} is not one: name a folder that "
                     f"exists, or end the name with / to make it ({out}/), or name one artifact")


def cmd_jobs(args) -> int:
    return over_http(args, _run, needs_key="jobs")


def _run(client, args) -> int:
    cmd = args.jobs_command
    if cmd == "submit":
        job = client.jobs.submit(args.kind, _params(args.params), idempotency_key=args.idempotency_key)
        print(job["id"])
        if args.wait:
            job = follow(client, job["id"], out=sys.stderr)
            print(json.dumps(job, indent=2))
            return _ended(job)
        return 0
    if cmd == "status":
        print(json.dumps(client.jobs.get(args.job_id), indent=2))
        return 0
    if cmd == "logs":
        if args.follow:
            return _ended(follow(client, args.job_id))
        print(client.jobs.logs(args.job_id).text, end="")
        return 0
    if cmd == "cancel":
        job = client.jobs.cancel(args.job_id)
        print(f"{job['id']}: {job['status']}" + (" (cancel requested)" if job["status"] == "running" else ""))
        return 0
    if cmd == "delete":
        client.jobs.delete(args.job_id)
        print(f"deleted {args.job_id}")
        return 0
    if cmd == "artifacts":
        for a in client.jobs.artifacts(args.job_id):
            print(f"{a['name']}  {a['size']}")
        return 0
    if cmd == "download":
        names = args.names or [a["name"] for a in client.jobs.artifacts(args.job_id)]
        out = _download_folder(args.out) if len(names) > 1 else args.out
        for name in names:
            print(client.jobs.download(args.job_id, name, out))
        return 0
    jobs = listed(client.jobs, args, "jobs", status=args.status, kind=args.kind)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    kind = max([len(j["kind"]) for j in jobs] + [10])  # transferability is 15 characters: the columns stay aligned
    for j in jobs:
        print(f"{j['id']}  {j['kind']:{kind}}  {j['status']:10}  {100 * j['progress']:5.1f}%  {j['step']}")
    return 0


def add_commands(sub) -> None:
    j = sub.add_parser("jobs", help="submit and follow offline jobs on a running server (over HTTP)")
    js = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    jsub = js.add_parser("submit", help="queue a job; prints its id")
    jsub.add_argument("kind", help="wrap, distill, ...")
    jsub.add_argument("--params", default="{}", help="the params: a JSON object, or a JSON file")
    jsub.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    jsub.add_argument("--wait", action="store_true", help="follow the log until the job ends")
    jst = js.add_parser("status", help="a job's status, progress and metrics (JSON)")
    jst.add_argument("job_id")
    jl = js.add_parser("logs", help="print a job's log")
    jl.add_argument("job_id")
    jl.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    jc = js.add_parser("cancel", help="cancel a queued or running job")
    jc.add_argument("job_id")
    jd = js.add_parser("delete", help="delete a finished job: its record, log and artifacts")
    jd.add_argument("job_id")
    ja = js.add_parser("artifacts", help="a job's artifacts: name and size in bytes")
    ja.add_argument("job_id")
    jdl = js.add_parser("download", help="save a job's artifacts (all, or those named); prints each file's path")
    jdl.add_argument("job_id")
    jdl.add_argument("names", nargs="*", help="artifact names (default: every one)")
    jdl.add_argument("--out", help="a directory (default: the current one; NAME/ makes it), or a file for one "
                     "artifact")
    jls = js.add_parser("list", help="your jobs (all jobs with an admin key)")
    jls.add_argument("--status")
    jls.add_argument("--kind")
    add_list_flags(jls, "jobs", 100)
    jls.add_argument("--json", action="store_true", help="print the jobs as a JSON list (for scripts)")
    for sp in js.choices.values():
        sp.add_argument("--url", help="the server (env SDB_URL, default http://127.0.0.1:8000)")
        sp.add_argument("--api-key", help="a key with the jobs scope; better env SDB_API_KEY: `ps` shows a "
                        "command's arguments to every local user")
    j.set_defaults(fn=cmd_jobs)
