"""The amalgamate, style and pose tasks: torch-free configs that are the one source of the job kinds' defaults,
and the amalgamation methods registered by name."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, replace

import pytest

from sdb_core.amalgamate.config import AFKConfig, BranchingConfig
from sdb_core.amalgamate.datafree.config import DataFreeConfig
from sdb_core.style.config import AdaINConfig, FastConfig, GatysConfig
from sdb_core.tasks import ModelRef, amalgamate
from sdb_core.tasks.amalgamate import METHODS, RECIPES, AmalgamateTask, Teacher
from sdb_core.tasks.pose import PoseTask
from sdb_core.tasks.style import StyleTask
from service.jobs.kinds.amalgamate import AmalgamateParams, _task
from service.jobs.kinds.okdhp import OKDHPParams
from service.jobs.kinds.style import StyleParams

TEACHERS = [{"name": "low", "file": "low.safetensors", "arch": "multilabel", "labels": [0, 1, 2]},
            {"name": "high", "file": "high.safetensors", "arch": "multilabel", "labels": [3, 4]}]


@pytest.fixture
def admin(tmp_path):
    """An admin key's submission on a data dir holding the teachers' files (an admin may name paths)."""
    from service.auth import ApiKey
    from service.jobs.kinds.base import Submission
    from service.settings import Settings

    for t in TEACHERS:
        (tmp_path / t["file"]).write_bytes(b"")
    key = ApiKey("admin0", "", frozenset({"admin"}), None, None, None, None, None, 0.0)
    return Submission(key, None, Settings(data_dir=tmp_path, secrets_dir=tmp_path.parent / "s"), None)


def test_task_configs_and_job_kinds_import_no_torch():
    code = ("import sys\n"
            "import sdb_core.tasks.amalgamate, sdb_core.tasks.style, sdb_core.tasks.pose\n"
            "import sdb_core.amalgamate.config, sdb_core.amalgamate.datafree.config, sdb_core.style.config\n"
            "import sdb_core.distill.okdhp_config\n"
            "import service.jobs.kinds.amalgamate, service.jobs.kinds.style, service.jobs.kinds.okdhp\n"
            "from sdb_core.tasks.amalgamate import AmalgamateTask, Teacher, plan\n"
            "from sdb_core.tasks import ModelRef\n"
            "t = AmalgamateTask('branching', (Teacher('a', ModelRef(arch='encdec', weights='w')),))\n"
            "plan(t), sdb_core.tasks.style.StyleTask('adain'), sdb_core.tasks.pose.PoseTask()\n"
            # The recipes' configs are settings only (the teachers are the recipes' arguments), and the one
            # TeacherSpec is reachable from both recipes' modules without torch.
            "from sdb_core.amalgamate.config import AFKConfig, TeacherSpec\n"
            "from sdb_core.amalgamate.datafree import DataFreeConfig, TeacherSpec as DataFreeTeacherSpec\n"
            "assert TeacherSpec is DataFreeTeacherSpec\n"
            "AFKConfig(tasks=[1, 2]), DataFreeConfig(target=[1, 2], in_shape=(1, 56, 56))\n"
            "TeacherSpec('a', None, [1])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_amalgamate_params_default_to_the_task_and_the_recipes(admin):
    p = AmalgamateParams(method="afk", teachers=TEACHERS)
    task = _task(p, admin)
    defaults = AmalgamateTask("afk", task.teachers)
    assert replace(task, seed=0) == defaults  # every shared option: the same default
    assert (defaults.grid, defaults.transfer, defaults.width_scale, defaults.eval_n) == \
        (AFKConfig.grid, AFKConfig.n_transfer, AFKConfig.width_scale, AFKConfig.eval_n)
    afk_train = next(f for f in fields(AFKConfig) if f.name == "train").default_factory()
    assert defaults.batch_size == DataFreeConfig.batch_size == afk_train.batch_size
    assert (defaults.gen_epochs, defaults.image_epochs, defaults.samples) == \
        (DataFreeConfig.gen_epochs, DataFreeConfig.image_epochs, DataFreeConfig.gen_samples)
    assert (defaults.scene_size, defaults.scene_classes, defaults.epochs) == \
        (BranchingConfig().size, BranchingConfig().num_classes, BranchingConfig().epochs)
    # The methods' schedules, where the params leave them unset: the recipes' (AFK fine-tunes longer and
    # branching keeps 3e-3, both named in the task module).
    assert amalgamate.schedule("datafree") == {"layer_epochs": DataFreeConfig.block_epochs,
                                               "finetune_epochs": DataFreeConfig.finetune_epochs,
                                               "lr": DataFreeConfig.student_lr}
    afk = amalgamate.schedule("afk")
    assert afk["layer_epochs"] == AFKConfig.layer_epochs and afk["finetune_epochs"] == amalgamate.AFK_FINETUNE_EPOCHS
    assert task.with_schedule().lr == afk["lr"] == afk_train.lr
    assert amalgamate.schedule("branching") == {"lr": amalgamate.BRANCHING_LR}


def test_style_params_default_to_the_recipes():
    defaults = StyleParams(method="gatys").model_dump(exclude={"method", "cpus", "gpus", "seed", "name", "deploy"})
    for method in ("gatys", "fast", "adain"):
        task = StyleTask.from_options(method, **defaults)
        assert task == StyleTask(method, **{method: task.recipe})  # nothing else was touched
        if method == "gatys":
            assert task.gatys == GatysConfig()
        elif method == "adain":
            assert task.adain == AdaINConfig()  # its styles: the embedded set, the default style among them
        else:  # the one shared option whose default is not the recipe's: epochs is AdaIN's for both
            assert task.fast == replace(FastConfig(), epochs=AdaINConfig().epochs)
    assert StyleTask.from_options("fast", style="/data/my style.png").model_name == "style-fast-my-style"
    with pytest.raises(ValueError, match="method"):
        StyleTask("other")


def test_okdhp_params_default_to_the_pose_task():
    defaults = OKDHPParams().model_dump(exclude={"cpus", "gpus", "seed", "name"})
    assert PoseTask.from_options(**defaults) == PoseTask()
    assert OKDHPParams().name == PoseTask().name
    changed = PoseTask.from_options(branch_stacks=[1, 3], target_branch=1, epochs=2, root="/srv/pose")
    assert changed.okdhp.branch_stacks == (1, 3) and changed.okdhp.train.epochs == 2
    assert changed.okdhp.data.root == "/srv/pose" and changed.okdhp.train.lr == PoseTask().okdhp.train.lr


def test_amalgamation_methods_are_registered_by_name():
    assert RECIPES.names() == sorted(METHODS)
    assert AmalgamateParams.model_fields["method"].annotation.__args__ == METHODS
    with pytest.raises(ValueError, match="known: afk, branching, datafree"):
        AmalgamateTask("other", (Teacher("a", ModelRef(arch="multilabel", weights="w")),))
    with pytest.raises(ValueError, match="family"):
        Teacher("a", ModelRef(arch="cnn", weights="w"))


def test_multilabel_problems_are_found_without_torch(admin):
    task = _task(AmalgamateParams(method="afk", teachers=TEACHERS, tasks=[2, 7], student_widths=[8, 8]), admin)
    problems = amalgamate.problems(task)
    assert any("[7] are not taught" in p for p in problems)
    assert any("student_widths needs 3 entries" in p for p in problems)
    assert amalgamate.plan(replace(task, student_widths=None)) == {"block0": 2, "block1": 2, "block2": 2,
                                                                   "finetune": 6}
    datafree = replace(task, method="datafree", tasks=None, student_widths=None)
    assert amalgamate.problems(datafree) == []
    assert list(amalgamate.plan(datafree))[-1] == "student_finetune"
