"""Data-free knowledge amalgamation with a group-stack dual-GAN (Ye et al., CVPR 2020, arXiv 2003.09088).

Setting: M frozen multi-label teachers (:class:`~sdb_core.amalgamate.multilabel.MultiLabelNet`
with B blocks each), each on its own label ids, and a target label set drawn from their
union. The recipe sees the teachers' weights and nothing else: no image, no label.

1. **Group-stack generator.** B generator blocks map noise to an image; the output of
   block j has the shape of the input of the last j blocks of a teacher, so it is judged
   by those blocks of every teacher (frozen), through a per-teacher *filter* (global
   pooling + two FC layers: a channel gate into that teacher's feature space). The last
   block's output is the image and enters every teacher unfiltered. Losses per judged
   stage (DAFL, arXiv 1904.01186, adapted to multi-label outputs): one-hot on the
   teacher's thresholded outputs (ε = 0.5), activation of the teacher's last features,
   information entropy of the batch's label frequencies, sparsity of the outputs; plus
   the consistency of every intermediate stage's predictions with the deepest stage's.
   Trained stage by stage (stage k trains generator blocks 1..k against stages ≤ k).
2. **Dual generator (the student).** Trained block by block on generated images: the
   output of its block b goes through a filter into teacher m's feature space at the
   same depth and through the rest of teacher m, and matches teacher m on the target
   labels that m holds (the task-level filter: m's other labels are ignored).
3. **Regrouping.** The student's blocks, then one branch per teacher (its last filter
   and a copy of that teacher's head, restricted to the target labels it holds): one
   multi-branch network whose outputs are the target labels in the order asked; an
   end-to-end fine-tune on generated images closes the gap the frozen blocks leave.

Additions beyond the paper, each a config field (``PAPER_RECIPE`` turns them all off): a
BN-statistics prior (``w_bn``), a label-conditioned generator (``label_rate``), mode seeking in
the image stage (``w_modeseek``), random shifts and affine warps of the student's generated
images (``shift``, ``warp``), and an adversarial fine-tune (``w_adv``, off by default).

The same student architecture trained on other images (real ones, noise, a DAFL single
generator) is what :func:`distill_student` does; ``benchmarks/datafree.py`` compares them.

Modules, in the order a reader needs them: ``config`` (the config and its defaults, the label
bookkeeping; a teacher is :class:`~sdb_core.amalgamate.config.TeacherSpec`, re-exported), ``networks``
(filters, the generator, the student and how each is shaped), ``losses``, ``images`` (the student's
shifts and warps, the PNG grid), ``stages`` (the generator, student and fine-tune training stages),
``recipe`` (:func:`datafree`, which takes the config and the teachers). Every public name is
importable from this package, lazily (PEP 562, as in ``sdb_core.protect``): ``config`` is torch-free,
so a job kind or a task reads the defaults without importing torch.
"""
from ...lazy import lazy_getattr

_MODULES = {
    "config": ("PAPER_RECIPE", "VARIANTS", "DataFreeConfig", "PhaseFn", "TeacherSpec", "label_plan", "label_union"),
    "images": ("augment", "random_shift", "random_warp", "save_grid"),
    "losses": ("activation_loss", "bn_statistics_loss", "consistency_loss", "entropy_loss", "generator_loss",
               "one_hot_loss", "run_teacher", "soft_bce", "sparsity_loss"),
    "networks": ("Branch", "FeatureFilter", "GroupStackGenerator", "MultiBranchStudent", "build_generator",
                 "build_student", "new_student", "regroup"),
    "recipe": ("DataFreeResult", "check_teachers", "datafree"),
    "stages": ("_ReverseGrad", "adversarial_finetune", "distill_student", "train_dual", "train_generator"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = [
    "PAPER_RECIPE", "VARIANTS", "Branch", "DataFreeConfig", "DataFreeResult", "FeatureFilter",
    "GroupStackGenerator", "MultiBranchStudent", "PhaseFn", "TeacherSpec", "_ReverseGrad", "activation_loss",
    "adversarial_finetune", "augment", "bn_statistics_loss", "build_generator", "build_student",
    "check_teachers", "consistency_loss", "datafree", "distill_student", "entropy_loss", "generator_loss",
    "label_plan", "label_union", "new_student", "one_hot_loss", "random_shift", "random_warp", "regroup",
    "run_teacher", "save_grid", "soft_bce", "sparsity_loss", "train_dual", "train_generator",
]
assert set(__all__) == set(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
