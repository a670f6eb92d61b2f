"""DEPARA: attribution graphs and their similarity (model selection on a zoo: tests/benchmarks/test_depara_zoo.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sdb_core.transfer.depara import (
    DeparaConfig,
    attribution_graph,
    attribution_maps,
    feature_relations,
    graph_similarity,
    spearman,
)


def tiny_net(seed: int, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 3)).to(dtype).eval()


@pytest.fixture
def probe():
    return torch.randn(12, 2, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_a_graph_is_1_plus_lambda_similar_to_itself(probe, lam):
    g = attribution_graph(tiny_net(0), probe, "3")
    assert graph_similarity(g, g, "depara", lam) == pytest.approx(1.0 + lam, abs=1e-9)
    assert graph_similarity(g, g, "depara_v") == pytest.approx(1.0, abs=1e-9)
    assert graph_similarity(g, g, "rsa") == pytest.approx(1.0, abs=1e-9)
    # A different model is less similar than the graph is to itself.
    other = attribution_graph(tiny_net(1), probe, "3")
    assert graph_similarity(g, other, "depara", lam) < 1.0 + lam - 1e-3


def test_similarity_is_symmetric(probe):
    a, b = attribution_graph(tiny_net(0), probe, "1"), attribution_graph(tiny_net(1), probe, None)
    for method in ("depara", "depara_v", "depara_e", "rsa"):
        assert graph_similarity(a, b, method, 10.0) == pytest.approx(graph_similarity(b, a, method, 10.0), abs=1e-12)


def test_a_copy_with_reordered_channels_has_the_same_graph(probe):
    net = tiny_net(0)
    perm1, perm2 = torch.randperm(6, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 0, 4, 1, 2])
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin[0].weight.copy_(net[0].weight[perm1])
        twin[0].bias.copy_(net[0].bias[perm1])
        twin[2].weight.copy_(net[2].weight[perm2][:, perm1])
        twin[2].bias.copy_(net[2].bias[perm2])
    # The twin's layer-3 output is the original's with its channels permuted: not the same tensor...
    assert not torch.allclose(twin[:4](probe), net[:4](probe))
    for layer in ("1", "3"):
        a, b = attribution_graph(net, probe, layer), attribution_graph(twin, probe, layer)
        # ...but the same graph.
        assert torch.allclose(a.nodes, b.nodes, atol=1e-6) and torch.allclose(a.edges, b.edges, atol=1e-6)
        assert graph_similarity(a, b, "depara", 1.0) == pytest.approx(2.0, abs=1e-6)


def test_centred_edges_ignore_what_every_probe_image_shares():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(20, 6, generator=g, dtype=torch.float64)
    shifted = f + 5.0 * torch.randn(1, 6, generator=g, dtype=torch.float64)  # one offset common to all images
    e, r = feature_relations(f, centre=True)
    e2, r2 = feature_relations(shifted, centre=True)
    assert torch.allclose(e, e2, atol=1e-9) and torch.allclose(r, r2, atol=1e-9)
    # plain cosines do see the common offset: every pair looks alike
    plain, plain2 = feature_relations(f)[0], feature_relations(shifted)[0]  # the default: plain cosines
    assert plain2.mean() > plain.mean() + 0.3
    # centred edges are the Pearson correlations between images' deviations from the probe-set mean
    c = f - f.mean(0)
    assert torch.allclose(e, torch.nn.functional.cosine_similarity(c[:, None], c[None], dim=2), atol=1e-9)


@pytest.mark.parametrize("attribution", ["sum", "norm"])
def test_attribution_maps_match_finite_differences(attribution):
    net = tiny_net(2, torch.float64)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    maps = attribution_maps(net, "3", x, attribution=attribution)

    def f(z):  # the layer's output summed (or its L2 norm), per image
        out = net[:4](z).flatten(1)
        return out.sum(1) if attribution == "sum" else out.norm(dim=1)

    eps = 1e-6
    grad = torch.zeros_like(x)
    for idx in range(x[0].numel()):
        e = torch.zeros(x[0].numel(), dtype=torch.float64)
        e[idx] = eps
        e = e.view_as(x[0])
        grad.view(2, -1)[:, idx] = (f(x + e) - f(x - e)) / (2 * eps)
    expected = (x * grad).abs().mean(1)
    assert maps.shape == (2, 5, 5)
    assert torch.allclose(maps, expected, atol=1e-6)
    assert maps.abs().sum() > 0
    with pytest.raises(ValueError, match="attribution"):
        DeparaConfig(attribution="max")


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 4, 3), centred: sum of products 3, squares 4.5 and 5
    assert spearman([1, 2, 2, 5], [1, 2, 9, 3]) == pytest.approx(3.0 / (4.5 * 5) ** 0.5)


def test_spearman_ranks_ties_like_a_brute_force_count():
    from sdb_core.transfer.depara import rankdata

    v = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(5)).double().numpy()
    # rank of a value = (number below) + (number equal + 1) / 2
    expected = [(v < x).sum() + ((v == x).sum() + 1) / 2 for x in v]
    assert rankdata(v).tolist() == pytest.approx(expected)


def test_graph_needs_the_same_probe_set(probe):
    a = attribution_graph(tiny_net(0), probe, "1")
    b = attribution_graph(tiny_net(0), probe[:6], "1")
    with pytest.raises(ValueError, match="probe"):
        graph_similarity(a, b)
    with pytest.raises(ValueError, match="layer"):
        attribution_graph(tiny_net(0), probe, "no.such.layer")


def test_a_hosted_models_onnx_graph_gives_the_torch_models_graph():
    from sdb_core.bundle import export_onnx
    from sdb_core.models import create_model
    from sdb_core.onnx_torch import OnnxModule

    torch.manual_seed(0)
    net = create_model("cnn", num_classes=10, in_shape=(1, 8, 8)).eval()
    graph = OnnxModule(export_onnx(net, (1, 8, 8)))
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(graph(x), net(x), atol=1e-5)
    relu = next(n for n in graph.layer_names() if n.endswith("features.4/Relu"))
    a, b = attribution_graph(net, x, "features.4"), attribution_graph(graph, x, relu)
    assert torch.allclose(a.nodes, b.nodes, atol=1e-5) and torch.allclose(a.edges, b.edges, atol=1e-6)
    with pytest.raises(ValueError, match="no layer"):
        attribution_graph(graph, x, "nope")


def _digit_folder(root, side: int, per_class: int = 8):
    """An ImageFolder of ``side``×``side`` grayscale PNGs, three classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (side, side), dtype=np.uint8)
            img[:, c * side // 3:(c + 1) * side // 3] += 180  # a class's bright band
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return f"imagefolder:{root}"


def test_transferability_reads_an_image_folder_at_the_size_its_models_take(tmp_path):
    """A bundle made for 16x16 images ranks on an ImageFolder read at 16x16 (as wrap, distill and audit read
    theirs), not at the folder's default 32, whether it is a source or the target."""
    from dataclasses import replace

    from sdb_core.bundle import export_bundle
    from sdb_core.models import create_model
    from sdb_core.tasks.refs import ModelRef
    from sdb_core.tasks.transfer import WEAK_TARGET, RankedModel, TransferTask, run
    from sdb_core.weights import save_weights

    torch.manual_seed(0)
    bundle = export_bundle(create_model("cnn", num_classes=3, in_shape=(1, 16, 16)).eval(), tmp_path / "b16",
                           name="b16", in_shape=(1, 16, 16), mean=(0.0,), std=(1.0,), labels=["0", "1", "2"])
    data = _digit_folder(tmp_path / "digits16", 16)
    source = RankedModel("b16", ModelRef(bundle=str(bundle)))
    outcome = run(TransferTask(sources=(source,), target_data=data, probe=4, target_train=12,
                               target_training=replace(WEAK_TARGET, epochs=1)), tmp_path / "out")
    assert outcome.result.names == ["target", "b16"]
    weights = save_weights(create_model("cnn", num_classes=3, in_shape=(1, 16, 16)), tmp_path / "w.safetensors")
    other = RankedModel("other", ModelRef(arch="cnn", weights=str(weights), num_classes=3))  # fixes no size
    outcome = run(TransferTask(sources=(other,),
                               target=replace(source, name="t"), probe_data=data, probe=4), tmp_path / "out2")
    assert outcome.result.names == ["target", "other"]


@pytest.mark.parametrize("outside", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_graphs_are_built_under_a_callers_no_grad_or_inference_mode(probe, outside):
    """torch.autograd.grad failed there with "element 0 of tensors does not require grad"."""
    net = tiny_net(0)
    want = attribution_graph(net, probe, "3")
    with outside():
        got = attribution_graph(net, probe * 1.0, "3")  # under inference_mode, an inference-tensor probe too
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got.nodes, want.nodes)
    torch.testing.assert_close(got.edges, want.edges)


def test_a_network_made_under_inference_mode_is_refused_in_words(probe):
    with torch.inference_mode():
        net = tiny_net(0)
    with pytest.raises(ValueError, match=r"outside torch.inference_mode\(\): it differentiates networks"):
        attribution_maps(net, "3", probe)


def test_ranking_leaves_the_models_in_the_modes_they_were_in(probe):
    from sdb_core.transfer.depara import rank_transferability

    target, source = tiny_net(0).train(), tiny_net(1)
    source[0].train()  # one module in train mode, the rest in eval
    rank_transferability(DeparaConfig(), target, {"s": source}, probe)
    assert all(m.training for m in target.modules())
    assert [m.training for m in source.modules()] == [m is source[0] for m in source.modules()]
