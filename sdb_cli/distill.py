"""``sdb distill``: train a student from a local teacher, a bundle, a remote server's keyed path, or labels alone."""
from __future__ import annotations

from sdb_core.distill.config import DistillConfig
from sdb_core.progress import Hooks
from sdb_core.tasks.distill import DistillTask

from .console import SDKWaits, add_training_flags, data_settings, err, progress_bar
from .teacher_norm import add_teacher_norm_flags, teacher_norm


def _remote_teacher(args):
    """The keyed path of a model on a remote SDB server, through the SDK's RemoteTeacher."""
    from sdb_client import Client, RemoteTeacher

    if not args.model:
        raise ValueError("--remote needs --model NAME (the served model to distill)")
    client = Client(args.remote, args.api_key)  # no --api-key: SDB_API_KEY
    if not client.has_key:
        raise ValueError("--remote needs an API key with the distill scope: --api-key or env SDB_API_KEY")
    info = client.model(args.model, version=args.version)  # fail before training on a wrong name or version,
    if not info.get("distillable", True):                    # or a Nasty-mode model
        raise ValueError(f"model {args.model!r} on {client.base_url} has no keyed path (Nasty mode)")
    # the version that answered, pinned: a deploy during training does not change the teacher under the student
    return RemoteTeacher(client, args.model, temperature=args.temperature, version=info.get("version") or args.version)


def cmd_distill(args) -> int:
    from sdb_core.tasks import ModelRef, distill

    teacher, source = None, "labels only"
    if not args.remote and (args.model or args.api_key or args.version):  # else the student would learn from labels alone
        raise ValueError("--model, --version and --api-key go with --remote URL (the server whose model to distill)")
    if args.authorized and not args.bundle:  # else, as above: labels alone, while the owner asked for the keyed path
        raise ValueError("--authorized goes with --bundle PATH (whose keyed path to distill)")
    if args.bundle and (args.teacher_mean is not None or args.teacher_std is not None):
        raise ValueError("--teacher-mean and --teacher-std go with --teacher (a bundle says its own normalisation)")
    if args.bundle:
        ref = ModelRef(bundle=args.bundle)
        source = f"bundle {args.bundle} ({'keyed path' if args.authorized else 'public outputs'})"
    elif args.teacher:
        ref = ModelRef(arch=args.teacher_arch, weights=args.teacher, **teacher_norm(args))
        source = f"teacher {args.teacher}"
    else:
        ref = None
    task = DistillTask.from_options(args.student, args.data, teacher=ref, keyed=args.authorized,
                                    transfer=args.transfer, temperature=args.temperature, alpha=args.alpha,
                                    epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    if args.remote:
        from sdb_client import SDBError

        try:
            teacher = _remote_teacher(args)
        except SDBError as e:  # malformed key or URL (a ValueError), unreachable, 401/403/404
            err(f"remote teacher: {e}")
            return 2
        pinned = f" version {teacher.version}" if teacher.version else ""
        source = f"remote model {args.model}{pinned} at {teacher.client.base_url} (keyed path)"
    master_key = data_settings(args).master_key if args.bundle and args.authorized else None
    try:
        with SDKWaits():  # a remote teacher's waits (its quota's Retry-After) said on stderr
            outcome = distill.run(task, args.out, Hooks(phase=progress_bar), teacher=teacher, master_key=master_key)
    except Exception as e:
        if not args.remote or not type(e).__module__.startswith("sdb_client"):
            raise
        err(f"remote teacher: {e}")  # e.g. the key's quota ran out mid-way
        return 2
    finally:
        if args.remote:
            teacher.close()
            teacher.client.close()
    print(f"student {args.student} from {source} on {outcome.transfer_size} images: "
          f"test accuracy {outcome.accuracy:.2f}%")
    print(f"saved to {args.out}")
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser("distill", help="train a student from a teacher, a bundle, or labels alone")
    d.add_argument("--student", required=True, help="student architecture")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True, help="where to save the student (.safetensors)")
    t = d.add_mutually_exclusive_group()
    t.add_argument("--teacher", metavar="MODEL", help="a local teacher: its weights (with --teacher-arch), or an "
                   "ONNX model (.onnx)")
    t.add_argument("--bundle", metavar="PATH", help="a protected bundle")
    t.add_argument("--remote", metavar="URL", help="an SDB server: distill from its keyed path over HTTP (with --model)")
    d.add_argument("--model", metavar="NAME", help="with --remote: the served model's name")
    d.add_argument("--version", help="with --remote: the model's version (default: its highest, pinned at the start)")
    d.add_argument("--api-key", help="with --remote: a key with the distill scope (default: env SDB_API_KEY)")
    d.add_argument("--teacher-arch", default="cnn")
    add_teacher_norm_flags(d)
    d.add_argument("--authorized", action="store_true", help="with --bundle: use the keyed path (needs the master key)")
    d.add_argument("--transfer", type=int, default=0, help="transfer-set size drawn from the train split (0: all)")
    base = DistillConfig()
    d.add_argument("--temperature", type=float, default=base.temperature)
    d.add_argument("--alpha", type=float, default=base.alpha)
    add_training_flags(d, epochs=base.train.epochs, lr=base.train.lr, batch=base.train.batch_size)
    d.set_defaults(fn=cmd_distill)
