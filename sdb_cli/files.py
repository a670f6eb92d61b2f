"""``sdb files upload|list|get|delete``: a running server's uploaded files over HTTP, through the SDK."""
from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

from .console import add_list_flags, listed, over_http


def cmd_files(args) -> int:
    return over_http(args, _run, needs_key="jobs or deploy")


def _run(client, args) -> int:
    cmd = args.files_command
    if cmd == "upload":
        f = client.files.upload(args.path, args.purpose, shared=args.shared)
        print(f["id"])
        print(f"uploaded {f['filename']} as {f['purpose']} ({f['format']}, {f['bytes']} bytes)", file=sys.stderr)
        return 0
    if cmd == "get":
        print(json.dumps(client.files.get(args.file_id), indent=2))
        return 0
    if cmd == "delete":
        client.files.delete(args.file_id)
        print(f"deleted {args.file_id}")
        return 0
    files = listed(client.files, args, "files")
    if args.json:
        print(json.dumps(files, indent=2))
        return 0
    for f in files:
        when = datetime.fromtimestamp(f["created_at"], UTC).strftime("%Y-%m-%d %H:%M")
        shared = "  shared" if f.get("shared") else ""
        print(f"{f['id']}  {f['purpose']:8}  {f['format']:12}  {f['bytes']:>12}  {when}  {f['filename']}{shared}")
    return 0


def add_commands(sub) -> None:
    from sdb_client._base import FILE_PURPOSES

    f = sub.add_parser("files", help="upload, list and delete files for jobs and deploys on a running server")
    fs = f.add_subparsers(dest="files_command", required=True, metavar="ACTION")
    fu = fs.add_parser("upload", help="upload a file (checked by the server); prints its id")
    fu.add_argument("path", help="the file; a folder is zipped first (a dataset's ImageFolder tree, a bundle)")
    fu.add_argument("--purpose", required=True, choices=FILE_PURPOSES,
                    help="weights (.safetensors or .pt), dataset (ImageFolder zip or .npz), image, bundle (.sdb)")
    fu.add_argument("--shared", action="store_true", help="every key may use it (admin keys only)")
    fl = fs.add_parser("list", help="your files and the shared ones (every file with an admin key)")
    add_list_flags(fl, "files", 1000)
    fl.add_argument("--json", action="store_true", help="print the files as a JSON list (for scripts)")
    fg = fs.add_parser("get", help="one file's record (JSON)")
    fg.add_argument("file_id")
    fd = fs.add_parser("delete", help="delete a file you uploaded")
    fd.add_argument("file_id")
    for sp in fs.choices.values():
        sp.add_argument("--url", help="the server (env SDB_URL, default http://127.0.0.1:8000)")
        sp.add_argument("--api-key", help="a key with the jobs or deploy scope; better env SDB_API_KEY: `ps` shows a "
                        "command's arguments to every local user")
    f.set_defaults(fn=cmd_files)
