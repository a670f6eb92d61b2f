"""The zoo's added tasks (loops, mod3, flip, colours, majority) and its per-task model cache."""
from __future__ import annotations

import numpy as np
import torch

from sdb_core.train import TrainConfig
from sdb_core.transfer.zoo import (
    TARGET_TASKS,
    TASKS,
    ZooConfig,
    build_zoo,
    digit_labels,
    mirror_half,
    scene_labels,
    task_data,
)


def test_digit_labels_on_every_digit():
    y = np.arange(10)
    labels = digit_labels(y)
    assert labels["loops"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 1, 1]  # 0, 6, 8, 9 close a loop
    assert labels["mod3"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert labels["parity"].tolist() == [0, 1] * 5 and labels["big"].tolist() == [0] * 5 + [1] * 5


def test_mirror_half_flips_exactly_the_labelled_images():
    pix = np.random.default_rng(0).random((40, 3, 5, 6)).astype(np.float32)  # asymmetric: a flip shows
    out, flipped = mirror_half(pix, np.random.default_rng(1))
    assert set(flipped.tolist()) == {0, 1}
    for img, src, f in zip(out, pix, flipped):
        assert np.array_equal(img, src[:, :, ::-1] if f else src)
    # the flip task's data: labels balanced enough and the images are the digits domain's, some mirrored
    data = task_data("flip", 200, "train", seed=0)
    assert 60 < int(data.tensors[1].sum()) < 140


def test_scene_labels_read_what_the_class_map_shows():
    seg = np.zeros((3, 4, 4), np.int64)
    seg[0, :2, :2] = 1  # class 1: 4 px
    seg[0, 2:, :] = 3  # class 3: 8 px -> majority 3, 2 classes seen
    seg[1, 0, 0] = 4  # one class, 1 px (the background owns the rest, but it is no class)
    seg[2, :, :1] = 2
    seg[2, :, 3:] = 1  # a tie of 4 px each: the lower class
    seg[2, 0, 1] = 3
    seg[2, 0, 2] = 4
    labels = scene_labels(seg, 4)
    assert labels["colours"].tolist() == [1, 0, 3]  # classes seen minus one
    assert labels["majority"].tolist() == [2, 3, 0]  # class minus one
    # on generated scenes both are in range and take more than one value
    data = {t: task_data(t, 200, "train", seed=0).tensors[1] for t in ("colours", "majority")}
    for t, y in data.items():
        assert 0 <= int(y.min()) and int(y.max()) < TASKS[t][2] and len(set(y.tolist())) > 1


def test_new_tasks_are_targets_and_keep_the_older_tasks_seeds():
    for t in ("loops", "mod3", "flip", "colours", "majority"):
        assert t in TARGET_TASKS and TASKS[t][1] == "cls"
    assert list(TASKS)[:10] == ["digit", "parity", "big", "rotation", "where", "nearest", "count", "seg", "depth",
                                "edges"]
    full, part = ZooConfig(seed=1), ZooConfig(tasks=("where", "parity"), seed=1)
    # the cache directory and each task's training seed do not depend on which tasks the zoo holds
    assert full.key() == part.key() != ZooConfig(seed=0).key()
    assert full.task_seed("parity") == part.task_seed("parity") == 101


def test_a_grown_zoo_trains_only_its_new_tasks(tmp_path):
    small = ZooConfig(tasks=("loops",), train_per_domain=60, test_per_domain=20,
                      train=TrainConfig(epochs=1, batch_size=30, lr=3e-3, optimizer="adam", weight_decay=0.0))
    first = build_zoo(small, cache_dir=tmp_path)
    path = first.directory / "loops.safetensors"
    stamp = path.stat().st_mtime_ns
    grown = build_zoo(ZooConfig(**{**small.__dict__, "tasks": ("loops", "mod3")}), cache_dir=tmp_path)
    assert grown.directory == first.directory and path.stat().st_mtime_ns == stamp  # loops read back, not retrained
    x = task_data("loops", 5, "test", seed=0).tensors[0]
    assert torch.equal(grown.models["loops"](x), first.models["loops"](x))
    assert (grown.directory / "mod3.safetensors").exists()
