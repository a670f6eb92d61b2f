"""Style transfer's settings: torch-free, the one source of their defaults (the loss network, the image
names, and the Gatys, fast and AdaIN configs). The recipes import them from here."""
from __future__ import annotations

from dataclasses import dataclass, field

_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "hubble_deep_field", "retina",
            "colorwheel", "brick", "grass", "gravel", "camera", "moon")
_SKLEARN = ("china", "flower")
EMBEDDED = _SKIMAGE + _SKLEARN
# The default training crops. chelsea (and cat, the same photograph) stay out: they are the
# evaluation image, so a feed-forward network is judged on a photograph it never saw.
CONTENT_IMAGES = ("astronaut", "coffee", "rocket", "china", "camera")
STYLE_IMAGES = ("flower", "immunohistochemistry", "hubble_deep_field", "brick", "gravel", "colorwheel")

# torchvision's VGG-19 "E" configuration: channels per 3x3 conv, "M" a 2x2 pool.
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _layer_names() -> list[str]:
    """``conv1_1, relu1_1, conv1_2, ..., pool1, conv2_1, ...`` in the order of ``features``."""
    names, block, conv = [], 1, 1
    for c in VGG19:
        if c == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 1
        else:
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
            conv += 1
    return names


LAYERS = _layer_names()
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


@dataclass
class LossNetConfig:
    weights: str | None = None  # a VGG-19 state dict (torchvision layout): .pth/.pt or .safetensors
    width: float = 0.25  # channel multiplier of the random network; user weights need 1.0
    seed: int = 0
    pool: str = "max"  # max (torchvision) | avg (Gatys et al. found smoother gradients)
    last: str = "relu5_1"  # the deepest layer built: nothing beyond it is computed

    def __post_init__(self) -> None:
        if not 0 < self.width <= 1:
            raise ValueError(f"width must be in (0, 1], got {self.width}")
        if self.weights is not None and self.width != 1.0:
            # VGG-19 weights fix the width: the full network, whatever the random default was.
            self.width = 1.0
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {self.pool!r}")
        if self.last not in LAYERS:
            raise ValueError(f"last must be a VGG-19 layer name (e.g. relu4_1), got {self.last!r}")


@dataclass
class GatysConfig:
    content: str = "chelsea"  # an embedded image name or a file path
    style: str = "flower"
    size: int = 256  # both images: shorter side resized, centre square cropped
    steps: int = 200  # Adam steps, or L-BFGS iterations
    optimizer: str = "lbfgs"  # lbfgs | adam
    lr: float | None = None  # default: 1.0 for L-BFGS, 0.02 for Adam
    init: str = "content"  # content | noise
    content_weight: float = 1.0
    style_weight: float = 10.0
    tv_weight: float = 0.0
    content_layers: tuple[str, ...] = ("relu4_1",)
    style_layers: tuple[str, ...] = STYLE_LAYERS
    loss_net: LossNetConfig = field(default_factory=LossNetConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (sdb_core.train.pick_device)

    def __post_init__(self) -> None:
        if self.optimizer not in ("lbfgs", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.init not in ("content", "noise"):
            raise ValueError(f"init must be 'content' or 'noise', got {self.init!r}")
        if not 16 <= self.size <= 2048:
            raise ValueError(f"size must be in [16, 2048], got {self.size}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("content_weight", "style_weight", "tv_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class FastConfig:
    style: str = "flower"  # an embedded image name or a file path
    content: str = "embedded"  # training crops: embedded | name,name,... | imagefolder:PATH
    eval_content: str = "chelsea"  # stylized at the end (not among the embedded training images)
    size: int = 256  # the style image and the evaluation image: shorter side, centre square
    crop: int = 96
    epochs: int = 3
    samples: int = 400  # crops per epoch
    batch_size: int = 4
    lr: float = 3e-3
    # 2, not 1: at 1 the benchmark's result kept SSIM 0.27 to the content with a style cut of 90%,
    # more style than the 80% target asks and less structure than its SSIM 0.3.
    content_weight: float = 2.0
    style_weight: float = 10.0
    tv_weight: float = 1.0
    # The first layer's width; the paper's network has 32. At 8 a 256x256 image takes ~0.1 s on one
    # CPU thread (16: ~0.4 s, dominated by the full-resolution 9x9 and upsampling convolutions).
    channels: int = 8
    res_blocks: int = 5
    # A shallow content layer beside relu4_1 keeps edges: the network sees each crop only a few times.
    content_layers: tuple[str, ...] = ("relu2_1", "relu4_1")
    style_layers: tuple[str, ...] = STYLE_LAYERS
    loss_net: LossNetConfig = field(default_factory=LossNetConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (sdb_core.train.pick_device)

    def __post_init__(self) -> None:
        if not 32 <= self.crop <= 1024 or self.crop % 4:
            raise ValueError(f"crop must be a multiple of 4 in [32, 1024], got {self.crop}")
        if not 16 <= self.size <= 2048:
            raise ValueError(f"size must be in [16, 2048], got {self.size}")
        if self.epochs < 1 or self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, samples and batch_size must be >= 1, got "
                             f"{self.epochs}, {self.samples}, {self.batch_size}")
        if not 4 <= self.channels <= 128 or not 0 <= self.res_blocks <= 16:
            raise ValueError(f"channels must be in [4, 128] and res_blocks in [0, 16], got "
                             f"{self.channels}, {self.res_blocks}")


@dataclass
class AdaINConfig:
    # Training styles: embedded names or files. Eleven (these, retina, grass, coffee, rocket, china)
    # with shuffle_style_channels measured worse on the benchmark's pair at 1,200 steps: cut 30.6%
    # at SSIM 0.495 with flower among them, 23.8% at 0.420 without it.
    styles: tuple[str, ...] = STYLE_IMAGES
    content: str = "embedded"  # training crops: embedded | name,name,... | imagefolder:PATH
    eval_content: str = "chelsea"
    eval_style: str = "flower"
    alpha: float = 1.0  # for the evaluation image
    # The encoder's last layer, where AdaIN acts. The paper's relu4_1 needs a decoder trained far
    # longer than a CPU allows: after 300 steps here its results had a *higher* style loss than the
    # content image (cut −24%), and after 600 steps with a decoder twice as wide it cut 27% at
    # SSIM 0.25; relu3_1's plain decoder, one pooling shallower, cut 60% at SSIM 0.27 in 600 steps.
    layer: str = "relu3_1"
    size: int = 256
    crop: int = 96
    epochs: int = 4
    samples: int = 400
    batch_size: int = 4
    lr: float = 2e-3
    style_weight: float = 10.0
    # Pixel identity term ‖g(f(c)) − c‖² (Park & Lee's SANet uses one): the paper trains its
    # decoder for 160k steps; with a few hundred here, a direct pixel signal is what teaches it
    # to invert the encoder at all. 0 gives the paper's loss.
    identity_weight: float = 10.0
    # The mean/std style loss's layers; None: relu1_1 up to the AdaIN layer, the paper's rule. All
    # five (STYLE_LAYERS, which the Gram loss counts) measured: cut 64.7% at SSIM 0.247 against
    # 59.8% at 0.266 (600 steps, the benchmark's pair): more style, less content, no target met.
    style_layers: tuple[str, ...] | None = None
    # The decoder's channels relative to the encoder's. Twice as wide (600 steps, no skips): cut
    # 64.8% at SSIM 0.225 against 59.8% at 0.266, more style for less content, and slower.
    decoder_width: float = 1.0
    # Shallower AdaIN outputs the decoder also receives, each where its activations reach that
    # resolution (an hourglass with skips, as Avatar-Net, Sheng et al. 2018, fuses scales): AdaIN(f1(c), f1(s))
    # at relu1_1 and relu2_1 hands the decoder the style's colour and fine statistics and the
    # content's edges, which relu3_1 alone forces it to re-invent. Measured on the benchmark's pair
    # (600 steps, the earlier six styles): cut 79.8% at SSIM 0.370 against 59.8% at 0.266 without;
    # both targets move the right way at once. () is the paper's single-level decoder.
    skips: tuple[str, ...] = ("relu1_1", "relu2_1")
    # Random channel permutations of the style crops: six palettes from each style image. Off by
    # default: measured only together with the eleven styles above (worse there), never alone.
    shuffle_style_channels: bool = False
    loss_net: LossNetConfig = field(default_factory=LossNetConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (sdb_core.train.pick_device)

    def __post_init__(self) -> None:
        if not self.styles:
            raise ValueError("styles must name at least one style image")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.layer not in ("relu2_1", "relu3_1", "relu4_1", "relu5_1"):
            raise ValueError(f"layer must be relu2_1|relu3_1|relu4_1|relu5_1, got {self.layer!r}")
        if not 32 <= self.crop <= 1024 or self.crop % 16:
            raise ValueError(f"crop must be a multiple of 16 in [32, 1024], got {self.crop}")
        if self.epochs < 1 or self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"epochs, samples and batch_size must be >= 1, got "
                             f"{self.epochs}, {self.samples}, {self.batch_size}")
