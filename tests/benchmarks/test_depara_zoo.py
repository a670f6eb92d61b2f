"""The DEPARA benchmark's harness (benchmarks/depara_zoo.py): the zoo's tasks, its model and ground-truth caches,
the transfer heads, and model selection on a tiny zoo."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from depara_zoo import (  # benchmarks/ is on sys.path: see conftest.py
    TARGET_TASKS,
    TASKS,
    ProbeConfig,
    ZooConfig,
    build_zoo,
    digit_labels,
    linear_probe,
    mirror_half,
    pooled_features,
    pooled_features_at,
    probe_images,
    readout_probe,
    scene_labels,
    task_data,
    transfer_accuracy,
    transfer_accuracy_draws,
)

from sdb_core.train import TrainConfig
from sdb_core.transfer.depara import DeparaConfig, rank_transferability, select_model
from sdb_core.transfer.task_models import ENCODER_LAYERS, FEATURE_LAYER, train_task_model


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


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    # 4 epochs: at 2 the parity source was barely trained (82%) and the edges source took first place under
    # the centred edges (the library's default); the own-task source must have learned its task to rank first
    cfg = ZooConfig(tasks=("parity", "rotation", "where", "edges"), train_per_domain=600, test_per_domain=50,
                    train=TrainConfig(epochs=4, batch_size=50, lr=3e-3, optimizer="adam", weight_decay=0.0))
    return build_zoo(cfg, cache_dir=tmp_path_factory.mktemp("zoo"))


def test_on_a_tiny_zoo_the_source_trained_on_the_targets_task_ranks_first(tiny_zoo):
    # A weak target model: the target task (parity) learned from 300 images, another seed.
    target = train_task_model("parity", task_data("parity", 300, "train", seed=5),
                              TrainConfig(epochs=4, batch_size=50, lr=3e-3, optimizer="adam", weight_decay=0.0, seed=9),
                              kind="cls", outputs=2)
    probe = probe_images("parity", 60)
    layers = dict.fromkeys(tiny_zoo.models, FEATURE_LAYER)
    ranking = select_model(target, tiny_zoo.models, probe, DeparaConfig(), target_layer=FEATURE_LAYER,
                           source_layers=layers)
    assert ranking.order[0] == "parity", ranking.scores
    result = rank_transferability(DeparaConfig(), target, tiny_zoo.models, probe, target_layer=FEATURE_LAYER,
                                  source_layers=layers, layer_candidates={"parity": ["encoder.1", FEATURE_LAYER]})
    assert result.ranking.order == ranking.order
    assert set(result.baselines) == {"depara", "depara_v", "depara_e", "rsa", "random"}
    assert result.matrix[0][0] == pytest.approx(1.0 + DeparaConfig().lam) and len(result.matrix) == 1 + len(tiny_zoo.models)
    assert set(result.layers["parity"].scores) == {"encoder.1", FEATURE_LAYER}


def test_features_of_several_layers_from_one_pass_are_each_layers_own(tiny_zoo):
    model, x = tiny_zoo.models["edges"], probe_images("where", 7)
    many = pooled_features_at(model, [*ENCODER_LAYERS, None], x, batch_size=3)
    for layer in [*ENCODER_LAYERS, None]:
        assert torch.allclose(many[layer], pooled_features(model, layer, x), atol=1e-6)
    assert many[None].shape == (7, 16)  # the one-channel edge map pooled to 4 x 4


def test_the_ground_truth_is_the_mean_over_draws_of_the_target_training_set(tiny_zoo):
    cfg = ProbeConfig(train_n=60, test_n=40, draws=2,
                      train=TrainConfig(epochs=3, batch_size=30, lr=1e-2, optimizer="adam", weight_decay=0.0))
    sources = {n: tiny_zoo.models[n] for n in ("rotation", "where")}
    draws = transfer_accuracy_draws(sources, "parity", cfg, layers=("encoder.1", FEATURE_LAYER))
    assert set(draws) == set(sources) and all(set(d) == {"encoder.1", FEATURE_LAYER} for d in draws.values())
    values = [v for d in draws.values() for v in d.values()]
    assert all(len(v) == 2 and all(0.0 <= a <= 100.0 for a in v) for v in values)
    # the draws are different training sets: not every accuracy repeats
    assert any(v[0] != v[1] for v in values)
    mean = transfer_accuracy(sources, "parity", cfg, layers=("encoder.1", FEATURE_LAYER))
    for n, d in draws.items():
        for layer, v in d.items():
            assert mean[n][layer] == pytest.approx(sum(v) / 2)
    with pytest.raises(ValueError, match="draws"):
        ProbeConfig(draws=0)


def test_the_ground_truth_cache_is_read_back_and_grows_by_draws(tiny_zoo, tmp_path):
    cfg = ProbeConfig(train_n=60, test_n=40, draws=1,
                      train=TrainConfig(epochs=2, batch_size=30, lr=1e-2, optimizer="adam", weight_decay=0.0))
    sources = {"where": tiny_zoo.models["where"]}
    one = transfer_accuracy_draws(sources, "parity", cfg, cache_dir=tmp_path)
    assert one == transfer_accuracy_draws(sources, "parity", cfg)  # the cache stores what is computed
    path = tmp_path / cfg.key() / "parity--where.json"
    # what is cached is what is returned: a value written into the file comes back, nothing is refitted
    path.write_text(path.read_text().replace(str(one["where"][FEATURE_LAYER][0]), "12.5"))
    two = transfer_accuracy_draws(sources, "parity", replace(cfg, draws=2), cache_dir=tmp_path)
    assert two["where"][FEATURE_LAYER][0] == 12.5 and len(two["where"][FEATURE_LAYER]) == 2
    # draw 1 fitted now is draw 1 of an uncached run; the key ignores draws and nothing else
    assert two["where"][FEATURE_LAYER][1] == transfer_accuracy_draws(sources, "parity", replace(cfg, draws=2))[
        "where"][FEATURE_LAYER][1]
    assert replace(cfg, draws=5).key() == cfg.key() != replace(cfg, train_n=61).key()


def test_the_readout_head_learns_what_a_linear_probe_cannot():
    # The label is the sign of the product of two channels' means (an XOR): no linear function of the
    # features separates it, the two-conv readout (the ground truth's default head) does.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 2, 4, 4, generator=g)
    y = ((x[:, 0].mean((1, 2)) * x[:, 1].mean((1, 2))) > 0).long()
    cfg = TrainConfig(epochs=25, batch_size=50, lr=3e-3, optimizer="adam", weight_decay=0.0)
    head = readout_probe(x[:800], y[:800], x[800:], y[800:], cfg, width=16)
    lin = linear_probe(x[:800].flatten(1), y[:800], x[800:].flatten(1), y[800:], cfg)
    assert head > 68.0 and lin < 60.0 and head > lin + 15.0, (head, lin)  # measured 75.5 vs 48.8
    with pytest.raises(ValueError, match="head"):
        ProbeConfig(head="mlp")
    assert ProbeConfig(head="linear").train.epochs != ProbeConfig().train.epochs  # each head its own schedule


def test_the_zoo_cache_returns_the_same_models(tiny_zoo):
    again = build_zoo(tiny_zoo.config, cache_dir=tiny_zoo.directory.parent)
    x = probe_images("rotation", 4)
    for name, m in tiny_zoo.models.items():
        assert torch.equal(m(x), again.models[name](x))
    assert again.scores == tiny_zoo.scores
