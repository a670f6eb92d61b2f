"""Knowledge amalgamation: students that learn from several teachers and no labels.

- ``multilabel``: the multi-label network family (``MultiLabelNet``) and mAP;
- ``afk``: amalgamating filtered knowledge, a task-customised student trained layer-wise;
- ``branching``: task branching (SBM) over dense scene tasks, with ``scene_tasks`` (tasks, losses, metrics);
- ``datafree``: the data-free group-stack dual-GAN (a package: config, networks, losses, stages, recipe);
- ``config``: the recipes' torch-free settings and ``TeacherSpec``. Hosted teachers are rebuilt by
  ``sdb_core.onnx_torch``.

Import the submodules directly (``from sdb_core.amalgamate.afk import afk``); this package
imports nothing eagerly, so ``import sdb_core.amalgamate`` stays cheap.
"""
