"""Knowledge amalgamation: students that learn from several teachers and no labels.

- ``multilabel``: the multi-label network family (``MultiLabelNet``) and mAP;
- ``afk``: amalgamating filtered knowledge, a task-customised student trained layer-wise.

Import the submodules directly (``from sdb_core.amalgamate.afk import afk``); this package
imports nothing eagerly, so ``import sdb_core.amalgamate`` stays cheap.
"""
