"""The task modules: torch-free configs that are the one source of defaults, and one model reference."""
from __future__ import annotations

import subprocess
import sys

import pytest

from sdb_cli.main import build_parser
from sdb_core.distill.config import DistillConfig
from sdb_core.protect.config import CheckConfig, SDBConfig
from sdb_core.tasks import ModelRef
from sdb_core.tasks.distill import DistillTask
from sdb_core.tasks.wrap import WrapTask


def test_task_configs_import_no_torch():
    code = ("import sys\n"
            "import sdb_core.tasks.wrap, sdb_core.tasks.distill, sdb_core.tasks.refs\n"
            "import sdb_core.protect.config, sdb_core.distill.config, sdb_core.train_config, sdb_core.progress\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_cli_defaults_build_the_library_defaults():
    args = build_parser().parse_args(["wrap", "--train-teacher", "--arch", "cnn", "--data", "digits", "--out", "b"])
    task = WrapTask.from_options(args.data, args.arch, teacher=args.teacher, lam=args.lam, epochs=args.epochs,
                                 lr=args.lr, batch_size=args.batch_size, max_accuracy_drop=args.max_accuracy_drop,
                                 max_keyed_drop=args.max_keyed_drop, min_leak_margin=args.min_leak_margin,
                                 check_attempts=args.check_attempts, check_budget=args.check_budget)
    assert task.sdb == SDBConfig() and task.check == CheckConfig()  # grad_clip and the rest survive
    assert task == WrapTask("digits", ModelRef(arch="cnn"))
    args = build_parser().parse_args(["distill", "--student", "mlp", "--data", "digits", "--out", "s"])
    task = DistillTask.from_options(args.student, args.data, temperature=args.temperature, alpha=args.alpha,
                                    epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    assert task.distill == DistillConfig()  # no --epochs: sized by optimiser steps, as the library's default
    args = build_parser().parse_args(["distill", "--student", "mlp", "--data", "digits", "--out", "s", "--epochs", "20"])
    given = DistillTask.from_options(args.student, args.data, epochs=args.epochs).distill
    assert given.for_transfer(1000).train.epochs == 20  # a flag given is kept, even the default's own count


def test_options_change_only_what_they_name():
    task = WrapTask.from_options("digits", "cnn", teacher="t.safetensors", lam=0.4, epochs=3, max_keyed_drop=0.5,
                                 check_attempts=2, check_budget=60.0)
    assert task.teacher == ModelRef(arch="cnn", weights="t.safetensors")
    assert (task.sdb.lam, task.sdb.train.epochs, task.sdb.train.grad_clip) == (0.4, 3, SDBConfig().train.grad_clip)
    assert task.check.thresholds.max_keyed_drop == 0.5
    assert task.check.thresholds.max_accuracy_drop == CheckConfig().thresholds.max_accuracy_drop
    assert (task.check.max_attempts, task.check.budget_seconds) == (2, 60.0)
    nasty = WrapTask.from_options("digits", "cnn", mode="nasty", epochs=4)
    assert nasty.nasty.train.epochs == 4 and nasty.sdb == SDBConfig()
    with pytest.raises(ValueError, match="mode"):
        WrapTask.from_options("digits", "cnn", mode="other")


def test_a_model_reference_names_one_source():
    assert ModelRef.parse("a=cnn:10:w.safetensors") == ("a", ModelRef(arch="cnn", weights="w.safetensors", num_classes=10))
    assert ModelRef.parse("b.sdb") == (None, ModelRef(bundle="b.sdb"))
    assert ModelRef(arch="cnn").kind == "untrained"
    hosted = ModelRef(model="m").hosted_at("/srv/m/2.sdb", "2")
    assert (hosted.kind, hosted.version) == ("bundle", "2") and "/srv" not in hosted.describe()
    for bad in ({"weights": "w"}, {"arch": "cnn", "weights": "w", "bundle": "b"}, {"version": "1", "arch": "cnn"}, {}):
        with pytest.raises(ValueError):
            ModelRef(**bad)
    with pytest.raises(ValueError, match="zoo architecture"):
        WrapTask("digits", ModelRef(bundle="b.sdb"))


def test_a_task_announces_its_phases_before_it_reports_them(tmp_path):
    from sdb_core.progress import Hooks
    from sdb_core.protect.key import new_master_key
    from sdb_core.tasks import wrap

    calls = []
    hooks = Hooks(plan=lambda **w: calls.append(("plan", w)), phase=lambda name: calls.append(("phase", name)))
    task = WrapTask.from_options("digits", "cnn", mode="nasty", teacher_epochs=1, epochs=1)
    out = wrap.run(task, tmp_path / "b.sdb", hooks, master_key=new_master_key())
    assert out.bundle.is_file()
    assert calls == [("plan", {"teacher": 1, "wrap": 1}), ("phase", "teacher"), ("phase", "wrap")]
