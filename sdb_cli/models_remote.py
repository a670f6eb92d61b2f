"""``sdb models deploy`` and ``release``, and ``list`` / ``remove`` with ``--url`` or ``--api-key``: the served models
on a running server, as an API key (a ``deploy`` key serves its bundles and removes their versions; an admin key any,
and releases the claim on a name). Without either, ``list``, ``add`` and ``remove`` work on the data dir as an admin
(:mod:`sdb_cli.admin`)."""
from __future__ import annotations

import json

from .console import over_http


def cmd_remote_models(args) -> int:
    needs = {"list": None, "release": "admin"}  # listing is public unless the server says otherwise
    return over_http(args, _run, needs_key=needs.get(args.models_command, "deploy (or admin)"))


def _policy(p: dict | None) -> str:
    """An answer's ``output_policy`` as ``sdb models list`` shows a row's (:func:`sdb_cli.admin.policy_text`)."""
    from types import SimpleNamespace

    from .admin import policy_text

    return policy_text(SimpleNamespace(**{"policy": "probs", "top_k": None, "decimals": None, **(p or {})}))


def _run(client, args) -> int:
    cmd = args.models_command
    if cmd == "deploy":
        m = client.deploy_model(args.path, name=args.name, policy=args.policy, top_k=args.top_k,
                                decimals=args.decimals)
        print(f"deployed {m['name']} version {m['version']} (output policy {_policy(m.get('output_policy'))})")
        return 0
    if cmd == "remove":
        for r in client.remove_model(args.name, version=args.version):
            print(f"removed {r['name']} version {r['version']}")
        return 0
    if cmd == "release":
        r = client.release_model_name(args.name, to=args.to)
        was = f"key {r['previous_owner']}'s" if r["previous_owner"] else "an admin's, or released"
        now = f"key {r['owner']} owns it now" if r["owner"] else "the next key to deploy under it claims it"
        print(f"released {r['name']} (it was {was}): {now}")
        return 0
    models = client.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"{'name':24}  {'version':10}  {'mode':6}  {'policy':12}  versions")
    for m in models:
        print(f"{m['name']:24}  {m['version']:10}  {m.get('mode', ''):6}  {_policy(m.get('output_policy')):12}  "
              f"{','.join(m.get('versions', []))}")
    return 0


def remote(args) -> bool:
    """Whether a ``models`` action runs on a server: ``deploy`` and ``release`` always; ``list`` and ``remove`` given
    ``--url`` or ``--api-key`` (``add`` never: it registers a bundle in place)."""
    return args.models_command in ("deploy", "release") or bool(getattr(args, "url", None)
                                                                or getattr(args, "api_key", None))


def add_release_command(actions) -> None:
    """``sdb models release NAME [--to KEY_ID]`` on the ``models`` actions' subparsers."""
    sp = actions.add_parser("release", help="release the claim on a model name that serves no version (its versions "
                            "removed first), as an admin key: the next key to deploy under it claims it, or --to's")
    sp.add_argument("name")
    sp.add_argument("--to", metavar="KEY_ID", help="give the name to this key (its id) instead")
    add_remote_flags(sp)


def add_remote_flags(sp) -> None:
    sp.add_argument("--url", help="the server (env SDB_URL, default http://127.0.0.1:8000); with --url or --api-key "
                    "the action runs there, as the key")
    sp.add_argument("--api-key", help="a key with the deploy scope, or admin; better env SDB_API_KEY: `ps` shows "
                    "a command's arguments to every local user")
