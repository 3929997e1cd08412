"""Student networks: a backbone that pools to one feature vector, a linear classifier and a projector.

Every architecture is wrapped in the same `Student` so the method code never branches on the arch:
`fc` gives class logits, `proj` gives the L2-normalised embedding used by the prototype and contrastive
losses (coreg-method.md §3.5: Linear(d,d)-ReLU-Linear(d,128), L2 norm).

Arches (`build_student(arch, ...)`):
- `preact_resnet18`: the paper's student (method §4), a pre-activation ResNet-18 for small images.
- `small_cnn`: a small GroupNorm CNN for CPU runs and tests.
- `timm:NAME`: any timm model, pooled, without its classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import CoregError

ARCHES = ("preact_resnet18", "small_cnn", "timm:NAME")
MIN_IMAGE_SIZE = 16  # below this the stride-2 stages of both built-in arches collapse to < 2x2 maps


class Student(nn.Module):
    """backbone -> pooled feature (feat_dim) -> fc logits; proj -> L2-normalised embedding."""

    def __init__(self, backbone: nn.Module, *, feat_dim: int, num_classes: int, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.proj_dim = proj_dim
        self.fc = nn.Linear(feat_dim, num_classes)
        self.proj = nn.Sequential(
            nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, proj_dim)
        )

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)  # (B, feat_dim)

    def forward(self, x: Tensor, with_embedding: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        h = self.features(x)  # (B, feat_dim)
        logits = self.fc(h)  # (B, C)
        if not with_embedding:
            return logits
        z = F.normalize(self.proj(h), dim=1)  # (B, proj_dim), unit rows
        return logits, z


# --------------------------------------------------------------------------------------------------------
# PreAct ResNet-18 (He et al. 2016, "Identity Mappings in Deep Residual Networks"; the CIFAR layout of PiCO)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut (1x1 conv on the activated input when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))  # (B, cin, H, W)
        skip = x if self.shortcut is None else self.shortcut(a)  # (B, cout, H/s, W/s)
        out = self.conv1(a)  # (B, cout, H/s, W/s)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    """3x3 stride-1 stem, no max-pool, stages of 2 blocks at 64/128/256/512 channels, global average pool.

    Layer1 has stride 2 for inputs of 64 px and more (method §4: "for 64x64 inputs layer1 has stride 2"),
    so a 64-px image reaches the same 4x4 final map as a 32-px one. Other sizes just give a different final
    map; the global average pool makes the feature 512-d regardless.
    """

    feat_dim = 512

    def __init__(self, image_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        strides = (2 if image_size >= 64 else 1, 2, 2, 2)
        widths = (64, 128, 256, 512)
        layers, cin = [], 64
        for w, s in zip(widths, strides, strict=True):
            layers.append(nn.Sequential(PreActBlock(cin, w, s), PreActBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        # Pre-activation blocks end on an un-normalised sum, so the final BN-ReLU belongs before pooling.
        self.bn = nn.BatchNorm2d(512)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)  # (B, 64, H, W)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, H/8 or H/16, ...)
        out = F.relu(self.bn(out))
        return out.mean(dim=(2, 3))  # (B, 512)


# --------------------------------------------------------------------------------------------------------
# Small CNN for CPU


def _conv_gn(cin: int, cout: int, stride: int) -> nn.Sequential:
    # GroupNorm normalises each sample on its own. BatchNorm would make a sample's output depend on the other
    # rows of its (per-process) batch, so a run split over 2 processes would differ from the same run in one
    # process; with GroupNorm they agree exactly, which the multi-process tests rely on.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """Six 3x3 conv-GroupNorm-ReLU layers, 16->32->64->128 channels, ~0.15M params, global average pool.

    Sized for CPU work (benchmarks with many methods and seeds, tests, the README demo): about 9M
    multiply-adds per 32-px image, a quarter of a 32->256-channel version.

    Three stride-2 steps take 32 px to a 4x4 map; larger inputs get extra stride-2 steps at the stem so
    the cost per image stays close to the 32-px cost (one step for >= 64 px, two for >= 128 px).
    """

    feat_dim = 128

    def __init__(self, image_size: int):
        super().__init__()
        extra = 0 if image_size < 64 else 1 if image_size < 128 else 2
        stem = [_conv_gn(3, 16, 2 if extra else 1)]
        if extra == 2:
            stem.append(_conv_gn(16, 16, 2))
        self.body = nn.Sequential(
            *stem,
            _conv_gn(16, 32, 2),
            _conv_gn(32, 32, 1),
            _conv_gn(32, 64, 2),
            _conv_gn(64, 64, 1),
            _conv_gn(64, 128, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))  # (B, 128)


# --------------------------------------------------------------------------------------------------------
# timm


def _first_line(e: Exception) -> str:
    """An exception as one short line: CoregError messages are single lines."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def _timm_backbone(name: str, *, image_size: int, pretrained: bool) -> tuple[nn.Module, int]:
    import timm  # imported here: timm is slow to import and only this arch needs it

    if not timm.is_model(name):
        raise CoregError(f"--arch timm:{name}: timm has no model {name!r}; see timm.list_models()")
    kwargs: dict = {}
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != (image_size, image_size):
        kwargs["img_size"] = image_size  # ViT-style models build their position embedding for this size
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as e:
        if pretrained:
            raise CoregError(
                f"--arch timm:{name}: pretrained weights are not available locally ({_first_line(e)}); "
                "put them in the Hugging Face cache first or train without --timm-pretrained"
            ) from e
        if "img_size" in kwargs:
            raise CoregError(
                f"--arch timm:{name} cannot be built for {image_size} px images ({_first_line(e)}); "
                f"try --image-size {cfg.input_size[1]}"
            ) from e
        raise
    # Probe once so a size the model cannot take fails here with a clear message, not mid-epoch.
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))  # (1, num_features)
    except Exception as e:
        raise CoregError(
            f"--arch timm:{name} cannot take {image_size} px images ({_first_line(e)}); "
            "choose another --image-size"
        ) from e
    model.train()
    if out.ndim != 2:
        raise CoregError(
            f"--arch timm:{name} does not pool to a feature vector (output shape {tuple(out.shape)})"
        )
    return model, out.shape[1]


# --------------------------------------------------------------------------------------------------------


def build_student(
    arch: str, *, num_classes: int, image_size: int, proj_dim: int = 128, pretrained: bool = False
) -> Student:
    """A fresh `Student` for `arch` at `image_size` px. Raises CoregError for an unknown arch or a bad size."""
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise CoregError(
            f"--image-size {image_size}: --arch {arch} needs images of at least {MIN_IMAGE_SIZE} px"
        )
    if pretrained and not arch.startswith("timm:"):
        raise CoregError(f"--timm-pretrained only applies to timm:NAME arches, not {arch!r}")
    if arch == "preact_resnet18":
        backbone, feat_dim = PreActResNet18(image_size), PreActResNet18.feat_dim
    elif arch == "small_cnn":
        backbone, feat_dim = SmallCNN(image_size), SmallCNN.feat_dim
    elif arch.startswith("timm:") and arch[5:]:
        backbone, feat_dim = _timm_backbone(arch[5:], image_size=image_size, pretrained=pretrained)
    else:
        raise CoregError(f"--arch {arch!r} is unknown; choose one of: {', '.join(ARCHES)}")
    return Student(backbone, feat_dim=feat_dim, num_classes=num_classes, proj_dim=proj_dim)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
