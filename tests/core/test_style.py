"""Style transfer: the losses on hand-computed cases, the loss network's weights, and each
method on a 64x64 pair with tiny settings."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdb_core.style import adain as adain_method
from sdb_core.style import fast, gatys
from sdb_core.style.images import (
    ContentCrops,
    content_images,
    decode_image,
    fit_square,
    load_image,
    png_bytes,
)
from sdb_core.style.loss_net import LAYERS, LossNet, LossNetConfig, build_loss_net
from sdb_core.style.losses import StyleCriterion, adain, gram, mean_std, mean_std_loss, relative_mse, tv_loss
from sdb_core.weights import WeightsError

TINY_NET = LossNetConfig(width=0.125)


def test_gram_matrix_on_a_hand_computed_case():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)  # C=2, H=1, W=2
    # F·Fᵀ = [[1+4, 3+8], [3+8, 9+16]], divided by C·H·W = 4
    assert torch.allclose(gram(f), torch.tensor([[[1.25, 2.75], [2.75, 6.25]]]))


def test_adain_on_a_hand_computed_case():
    content = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2)  # mean 2, std 1
    style = torch.tensor([10.0, 14.0, 10.0, 14.0]).reshape(1, 1, 2, 2)  # mean 12, std 2
    out = adain(content, style, eps=0.0)
    assert torch.allclose(out, torch.tensor([10.0, 14.0]).reshape(1, 1, 1, 2))


def test_adain_output_has_the_style_features_channel_statistics():
    g = torch.Generator().manual_seed(0)
    content = torch.randn(2, 5, 7, 9, generator=g) * 3 + 1
    style = torch.randn(2, 5, 4, 6, generator=g) * torch.arange(1.0, 6.0).view(1, 5, 1, 1) - 2
    out = adain(content, style)
    (mo, so), (ms, ss) = mean_std(out), mean_std(style)
    assert torch.allclose(mo, ms, atol=1e-4) and torch.allclose(so, ss, atol=1e-3)
    assert not torch.allclose(mean_std(content)[1], ss, atol=0.1)  # the statistics did change


def test_mean_std_loss_total_variation_and_relative_mse_by_hand():
    a = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)  # mean 1, std 1
    b = torch.tensor([1.0, 5.0]).reshape(1, 1, 1, 2)  # mean 3, std 2
    assert mean_std_loss([a], [b]).item() == pytest.approx(4.0 + 1.0, abs=1e-4)
    assert mean_std_loss([a, b], [a, b]).item() == pytest.approx(0.0, abs=1e-8)
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    assert tv_loss(x).item() == pytest.approx(1.0)  # no vertical change, horizontal steps of 1
    # ‖[-1, 1]‖²/2 = 1 over ‖[2, 0]‖²/2 = 2
    assert relative_mse(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])).item() == pytest.approx(0.5)


def test_style_criterion_is_zero_for_the_style_image_and_scale_free_per_layer():
    net = build_loss_net(TINY_NET)
    style, content = fit_square(load_image("flower"), 64), fit_square(load_image("chelsea"), 64)
    crit = StyleCriterion(net, style)
    assert crit.evaluate(style, style)["style_loss"] == pytest.approx(0.0, abs=1e-6)
    assert crit.evaluate(content, content)["content_loss"] == pytest.approx(0.0, abs=1e-6)
    assert crit.evaluate(content, content)["style_loss"] > 0.05


def test_the_random_loss_network_is_seeded_and_described():
    a, b, c = (build_loss_net(LossNetConfig(width=0.125, seed=s)) for s in (0, 0, 1))
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(a(x, ["relu3_1"])["relu3_1"], b(x, ["relu3_1"])["relu3_1"])
    assert not torch.equal(a(x, ["relu3_1"])["relu3_1"], c(x, ["relu3_1"])["relu3_1"])
    assert a.describe() == {"kind": "random-vgg19", "width": 0.125, "pool": "max", "last": "relu5_1", "seed": 0}
    assert not any(p.requires_grad for p in a.parameters())


def _torchvision_vgg19_state(last: str) -> dict[str, torch.Tensor]:
    """A VGG-19 state dict in torchvision's layout, up to ``last``, plus a classifier to ignore."""
    state = LossNet(LossNetConfig(width=1.0, last=last)).state_dict()
    g = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_vgg19_weights_load_from_a_local_state_dict(tmp_path, fmt):
    state = _torchvision_vgg19_state("relu3_1")
    path = tmp_path / f"vgg19.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": state}, path)  # a wrapped dict, as training scripts save
    else:
        save_file(state, str(path))
    net = build_loss_net(LossNetConfig(weights=str(path), width=0.25, last="relu3_1"))
    assert net.cfg.width == 1.0 and net.channels("relu3_1") == 256
    assert torch.equal(net.features[10].weight, state["features.10.weight"])  # conv3_1 is features.10
    assert LAYERS[10] == "conv3_1"
    d = net.describe()
    assert d["kind"] == "vgg19-weights" and d["weights"] == path.name and len(d["sha256"]) == 64


def test_a_wrong_layout_is_refused_with_a_clear_error(tmp_path):
    bn = {"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64),
          "features.1.weight": torch.ones(64), "features.1.running_mean": torch.zeros(64),
          "features.3.weight": torch.zeros(64, 64, 3, 3)}  # VGG-19-BN: the convs are at other indices
    torch.save(bn, tmp_path / "bn.pth")
    with pytest.raises(WeightsError, match="not a VGG-19 state dict in torchvision's layout.*missing features.2"):
        build_loss_net(LossNetConfig(weights=str(tmp_path / "bn.pth"), last="relu2_1"))
    small = {k: v[: v.shape[0] // 2] for k, v in _torchvision_vgg19_state("relu1_2").items()}
    save_file(small, str(tmp_path / "half.safetensors"))
    with pytest.raises(WeightsError, match=r"wrong shapes .*features\.0\.weight: \(32, 3, 3, 3\) \(VGG-19 has \(64, 3, 3, 3\)\)"):
        build_loss_net(LossNetConfig(weights=str(tmp_path / "half.safetensors"), last="relu1_2"))
    with pytest.raises(WeightsError, match="no weights file"):
        build_loss_net(LossNetConfig(weights=str(tmp_path / "absent.pth")))


def test_images_embedded_png_round_trip_and_crops():
    img = load_image("brick")  # grayscale texture, given three channels
    assert img.shape == (3, 512, 512) and 0.0 <= img.min() and img.max() <= 1.0
    back = decode_image(png_bytes(img))
    assert (back - img).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(ValueError, match="not an embedded name"):
        load_image("no-such-image")
    with pytest.raises(ValueError, match="PNG or JPEG"):
        decode_image(b"GIF89a not really")
    crops = ContentCrops([load_image("astronaut"), load_image("coffee")], 48, 10)
    torch.manual_seed(0)
    a = torch.stack([crops[i][0] for i in range(10)])
    torch.manual_seed(0)
    b = torch.stack([crops[i][0] for i in range(10)])
    assert a.shape == (10, 3, 48, 48) and torch.equal(a, b)  # seeded by the global generator
    assert (a[0] - a[1]).abs().mean() > 0.01  # and every item a new crop
    red = torch.zeros(3, 40, 40)
    red[0] = 1.0
    shuffled = ContentCrops([red], 32, 30, jitter=0.0, shuffle_channels=True)
    torch.manual_seed(0)
    lit = {int(shuffled[i][0].mean((1, 2)).argmax()) for i in range(30)}
    assert lit == {0, 1, 2}  # the style's colours permuted: one image gives several palettes


def test_training_crops_from_a_users_image_folder(tmp_path):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / "a.png").write_bytes(png_bytes(torch.rand(3, 40, 60)))
    (tmp_path / "photos" / "sub" / "b.png").write_bytes(png_bytes(torch.rand(3, 900, 700)))
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    images = content_images(f"imagefolder:{tmp_path / 'photos'}")
    assert [tuple(i.shape) for i in images] == [(3, 40, 60), (3, 512, 398)]  # found recursively, big ones shrunk
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        content_images(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="does not exist"):
        content_images(f"imagefolder:{tmp_path / 'absent'}")
    assert len(content_images("astronaut, coffee")) == 2


def _sixteen_bit_gradient(width: int = 64) -> Image.Image:
    """A left-to-right gradient over 16 bits: Pillow's convert("RGB") clips it to white past 255 of 65535."""
    return Image.fromarray(np.tile(np.linspace(0, 65535, width), (width // 2, 1)).astype(np.uint16))


def test_a_sixteen_bit_png_is_read_over_its_depth_not_clipped_white():
    buf = io.BytesIO()
    _sixteen_bit_gradient().save(buf, "PNG")
    img = decode_image(buf.getvalue())
    assert img.shape == (3, 32, 64)
    assert abs(img.mean().item() - 0.5) < 0.01 and (img > 0.999).float().mean() < 0.05
    assert img[:, :, 0].max() < 0.01 and img[:, :, -1].min() > 0.99  # black on the left, white on the right
    tiff = io.BytesIO()
    _sixteen_bit_gradient().save(tiff, "TIFF")
    with pytest.raises(ValueError, match="TIFF is not PNG or JPEG"):  # an uploaded image is a PNG or a JPEG
        decode_image(tiff.getvalue())


def test_training_crops_from_a_folder_in_every_imagefolder_format(tmp_path):
    """The ImageFolder upload takes BMP, TIFF, WebP, GIF, PPM besides PNG/JPEG: crops are read from each, and a
    16-bit image over its depth."""
    yy, xx = np.mgrid[0:24, 0:40]
    pixels = np.stack([xx * 6, yy * 10, 255 - xx * 6], axis=-1).astype(np.uint8)  # smooth: JPEG and GIF keep it
    folder = tmp_path / "crops"
    for fmt, ext in (("BMP", "bmp"), ("TIFF", "tiff"), ("WEBP", "webp"), ("GIF", "gif"), ("PPM", "ppm"),
                     ("JPEG", "jpg")):
        (folder / fmt.lower()).mkdir(parents=True)
        Image.fromarray(pixels).save(folder / fmt.lower() / f"a.{ext}", fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    _sixteen_bit_gradient().save(folder / "deep.png")
    _sixteen_bit_gradient().save(folder / "deep.tif")
    names = ["bmp", "deep.png", "deep.tif", "gif", "jpeg", "ppm", "tiff", "webp"]  # the sorted file order
    images = dict(zip(names, content_images(f"imagefolder:{folder}")))
    assert len(images) == len(names) and all(tuple(i.shape[1:]) == (24, 40) for n, i in images.items()
                                               if not n.startswith("deep"))
    exact = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    for lossless in ("bmp", "ppm", "tiff", "webp"):
        assert torch.allclose(images[lossless], exact, atol=1e-6), lossless
    assert (images["jpeg"] - exact).abs().mean() < 0.03 and (images["gif"] - exact).abs().mean() < 0.03
    for deep in ("deep.png", "deep.tif"):
        assert abs(images[deep].mean().item() - 0.5) < 0.01, deep  # not (almost) white
    (folder / "bmp" / "broken.bmp").write_bytes(b"BM not really")
    with pytest.raises(ValueError, match="broken.bmp"):
        content_images(f"imagefolder:{folder}")


def test_networks_keep_the_image_size_and_range():
    net = fast.TransformerNet(channels=4, res_blocks=1)
    y = net(torch.rand(2, 3, 36, 44))
    assert y.shape == (2, 3, 36, 44) and 0.0 <= y.min() and y.max() <= 1.0
    loss_net = build_loss_net(TINY_NET)
    model = adain_method.AdaINNet(adain_method.Encoder(loss_net, "relu4_1"),
                                  adain_method.Decoder(loss_net, "relu4_1"))
    out = model(torch.rand(3, 3, 40, 56), torch.rand(1, 3, 64, 32), torch.tensor([0.5]))
    assert out.shape == (3, 3, 40, 56)


def test_adain_decoder_skips_carry_the_shallow_features():
    loss_net = build_loss_net(TINY_NET)
    dec = adain_method.Decoder(loss_net, "relu3_1", skips=("relu1_1", "relu2_1"))
    assert dec.entries == ["relu2_1", "relu1_1", None]  # deepest first, each at its own resolution
    enc = adain_method.Encoder(loss_net, ("relu1_1", "relu2_1", "relu3_1"))
    model = adain_method.AdaINNet(enc, dec)
    x = torch.rand(2, 3, 32, 40)
    assert model(x, torch.rand(1, 3, 48, 48), torch.ones(1)).shape == (2, 3, 32, 40)
    feats = enc(x)
    changed = dict(feats, relu1_1=feats["relu1_1"] + 1.0)
    with torch.no_grad():
        assert (dec(changed) - dec(feats)).abs().max() > 1e-4  # the full-resolution skip reaches the output
    with pytest.raises(ValueError, match="shallower than relu3_1"):
        adain_method.Decoder(loss_net, "relu3_1", skips=("relu4_1",))
    with pytest.raises(ValueError, match="relu<b>_1"):
        adain_method.Decoder(loss_net, "relu3_1", skips=("relu1_2",))


def _cut(losses: dict) -> float:
    return 1.0 - losses["style_loss"] / losses["style_loss_content"]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_gatys_lowers_the_style_loss(optimizer):
    cfg = gatys.GatysConfig(size=64, steps=15, optimizer=optimizer, lr=0.05 if optimizer == "adam" else None,
                            loss_net=TINY_NET)
    r = gatys.stylize(cfg)
    assert r.image.shape == (3, 64, 64) and r.loss_net["kind"] == "random-vgg19"
    assert _cut(r.losses) > 0.3, r.losses
    assert r.losses["content_loss"] < 1.0
    assert r.history[-1]["loss"] < r.history[0]["loss"]


def test_fast_network_training_lowers_the_style_loss():
    cfg = fast.FastConfig(size=64, crop=32, epochs=3, samples=32, batch_size=4, channels=4, res_blocks=1,
                          lr=0.01, loss_net=TINY_NET)
    r = fast.train(cfg)
    styles = [e["style"] for e in r.history.epochs]
    assert styles[-1] < 0.8 * styles[0], styles
    assert _cut(r.losses) > 0.0, r.losses
    assert r.image.shape == (3, 64, 64)


def test_adain_decoder_training_lowers_the_style_loss():
    cfg = adain_method.AdaINConfig(size=64, crop=32, epochs=3, samples=32, batch_size=4, lr=0.005,
                                   styles=("flower", "brick"), loss_net=TINY_NET)
    r = adain_method.train(cfg)
    styles = [e["style"] for e in r.history.epochs]
    assert styles[-1] < 0.8 * styles[0], styles
    assert _cut(r.losses) > 0.0, r.losses
    assert r.image.shape == (3, 64, 64) and r.multiple == 4  # relu3_1: two poolings
