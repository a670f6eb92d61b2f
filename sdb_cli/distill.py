"""``sdb distill``: train a student from a local teacher, a bundle, a remote server's keyed path, or labels alone."""
from __future__ import annotations

from sdb_core.distill.config import DistillConfig
from sdb_core.progress import Hooks
from sdb_core.tasks.distill import DistillTask

from .console import SDKWaits, add_training_flags, data_settings, err, progress_bar
from .teacher_norm import add_teacher_norm_flags, teacher_norm


def _remote_teacher(args):
    """The keyed path of a model on a remote SDB server, through the SDK's RemoteTeacher; and the model's description
    (``GET /v1/models/{name}``: its input shape and labels)."""
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
    teacher = RemoteTeacher(client, args.model, temperature=args.temperature, batch_size=args.teacher_batch_size,
                            version=info.get("version") or args.version)
    return teacher, info


def _on_data(teacher, info: dict, data):
    """The remote teacher as a teacher of ``data``: a model that takes other inputs or answers another number of
    classes is refused (before any sample is asked for, so before any is charged to the key), and one that names the
    set's classes in another order answers them in the set's order (as ``--bundle`` does)."""
    from sdb_core.tasks.refs import class_order

    who = f"the remote model {info.get('name')!r}"
    takes, labels = list(info["input"]["shape"]), info.get("labels") or []
    if takes != list(data.in_shape) or len(labels) != data.num_classes:
        raise ValueError(f"{who} takes inputs {takes} and answers {len(labels)} classes; the data set {data.name!r} "
                         f"has inputs {list(data.in_shape)} and {data.num_classes} classes: distil it on a data set of "
                         "its own kind")
    order = class_order(labels, data, who)
    if order is None:
        return teacher
    return lambda x: teacher(x)[:, order]  # the set's classes, in its order


def cmd_distill(args) -> int:
    from sdb_core.tasks import ModelRef, distill

    teacher, source, data = None, "labels only", None
    if not args.remote and (args.model or args.api_key or args.version or args.teacher_batch_size is not None):
        # else the student would learn from labels alone
        raise ValueError("--model, --version, --api-key and --teacher-batch-size go with --remote URL (the server "
                         "whose model to distill)")
    if args.authorized and not args.bundle:  # else, as above: labels alone, while the owner asked for the keyed path
        raise ValueError("--authorized goes with --bundle PATH (whose keyed path to distill)")
    if args.bundle and (args.teacher_mean is not None or args.teacher_std is not None):
        raise ValueError("--teacher-mean and --teacher-std go with --teacher (a bundle says its own normalisation)")
    if args.bundle:
        ref = ModelRef(bundle=args.bundle)
        source = f"bundle {args.bundle} ({'keyed path' if args.authorized else 'public outputs'})"
    elif args.teacher:
        onnx = args.teacher.lower().endswith(".onnx")  # it brings its own network: no architecture with it
        arch = args.teacher_arch if onnx or args.teacher_arch is not None else "cnn"
        ref = ModelRef(arch=arch, weights=args.teacher, **teacher_norm(args))
        source = f"teacher {args.teacher}"
    else:
        ref = None
    task = DistillTask.from_options(args.student, args.data, teacher=ref, keyed=args.authorized,
                                    transfer=args.transfer, temperature=args.temperature, alpha=args.alpha,
                                    epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    if args.remote:
        from sdb_client import SDBError

        from sdb_core.data import load_dataset

        try:
            remote, info = _remote_teacher(args)
        except SDBError as e:  # malformed key or URL (a ValueError), unreachable, 401/403/404
            err(f"remote teacher: {e}")
            return 2
        try:
            data = load_dataset(task.data)
            teacher = _on_data(remote, info, data)
        except BaseException:
            remote.close()
            remote.client.close()
            raise
        pinned = f" version {remote.version}" if remote.version else ""
        source = f"remote model {args.model}{pinned} at {remote.client.base_url} (keyed path)"
    master_key = data_settings(args).master_key if args.bundle and args.authorized else None
    try:
        with SDKWaits():  # a remote teacher's waits (its quota's Retry-After) said on stderr
            outcome = distill.run(task, args.out, Hooks(phase=progress_bar), teacher=teacher, data=data,
                                  master_key=master_key)
    except Exception as e:
        if not args.remote or not type(e).__module__.startswith("sdb_client"):
            raise
        err(f"remote teacher: {e}")  # e.g. the key's quota ran out mid-way
        return 2
    finally:
        if args.remote:
            remote.close()
            remote.client.close()
    print(f"student {args.student} from {source} on {outcome.transfer_size} images, {len(outcome.history)} epochs: "
          f"test accuracy {outcome.accuracy:.2f}%")
    print(f"saved to {args.out}")
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser("distill", help="train a student from a teacher, a bundle, or labels alone")
    d.add_argument("--student", required=True, help="student architecture")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True, help="where to save the student's weights (written as safetensors whatever the name: "
                   "SDB reads them back, torch.load does not)")
    t = d.add_mutually_exclusive_group()
    t.add_argument("--teacher", metavar="MODEL", help="a local teacher: its weights (with --teacher-arch), or an "
                   "ONNX model (.onnx)")
    t.add_argument("--bundle", metavar="PATH", help="a protected bundle")
    t.add_argument("--remote", metavar="URL", help="an SDB server: distill from its keyed path over HTTP (with --model)")
    d.add_argument("--model", metavar="NAME", help="with --remote: the served model's name")
    d.add_argument("--version", help="with --remote: the model's version (default: its highest, pinned at the start)")
    d.add_argument("--api-key", help="with --remote: a key with the distill scope; better env SDB_API_KEY: `ps` shows a "
                   "command's arguments to every local user")
    d.add_argument("--teacher-batch-size", type=int, metavar="N", help="with --remote: samples per request to the "
                   "server at most (default: the SDK's 256, fewer where they would be over its body limit)")
    d.add_argument("--teacher-arch", help="with --teacher WEIGHTS: their architecture (default cnn); not with an "
                   ".onnx teacher, which brings its own")
    add_teacher_norm_flags(d)
    d.add_argument("--authorized", action="store_true", help="with --bundle: use the keyed path (needs the master key)")
    d.add_argument("--transfer", type=int, default=0, help="transfer-set size drawn from the train split (0: all)")
    base = DistillConfig()
    d.add_argument("--temperature", type=float, default=base.temperature)
    d.add_argument("--alpha", type=float, default=base.alpha)
    # no --epochs: the task's default, sized by optimiser steps (DistillConfig.min_steps)
    add_training_flags(d, epochs=None, lr=base.train.lr, batch=base.train.batch_size)
    d.set_defaults(fn=cmd_distill)
