"""Model construction on torchvision's definitions.

``build_model(arch, num_classes, stem, width)`` is the one place models are made:

* ``stem="imagenet"`` is torchvision's model as is (224px inputs).  At ``width=1`` the three
  reference archs are exactly torchvision's (134.68M / 23.71M / 2.352M parameters at 100 classes).
* ``stem="cifar"`` adapts the stem for small inputs (32px and below): no stride in the first
  convolution, no stem max-pool, and a global-pool + single linear head for VGG.
* ``width`` scales every channel count so the default pipeline runs fast on a laptop CPU.

Any other torchvision classification model that uses ``BatchNorm2d`` is accepted by name at
``stem="imagenet"`` and ``width=1``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg
from torchvision.models.mobilenetv2 import MobileNetV2

from slimcore.archs import REFERENCE_ARCHS, STEMS, classification_archs, min_image_size

# Builders whose auxiliary heads would change the training loop's output type.
_EXTRA_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
SPEC_ATTR = "slimcore_spec"  # every model build_model returns carries its ModelSpec here
PLAN_ATTR = "slimcore_plan"  # and slim() adds its pruning plan (torch-pruning history) here


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an unpruned model: stored in every checkpoint."""

    arch: str
    num_classes: int
    stem: str = "imagenet"
    width: float = 1.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.stem, self.width)

    @property
    def min_image_size(self) -> int:
        return min_image_size(self.arch, self.stem)

    def example_inputs(self, image_size: int | None = None, batch: int = 1) -> torch.Tensor:
        """A random input batch (default size: the smallest the arch accepts, cheap to trace)."""
        size = image_size or self.min_image_size
        return torch.randn(batch, 3, size, size)


def spec_of(model: nn.Module) -> ModelSpec:
    """The ModelSpec a model was built from (raises for models build_model did not make)."""
    spec = getattr(model, SPEC_ATTR, None)
    if not isinstance(spec, ModelSpec):
        raise ValueError(
            "model carries no slimcore ModelSpec: build it with slimcore.models.build_model, "
            "or pass spec= explicitly"
        )
    return spec


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width``, rounded to a multiple of ``divisor`` (at least 4)."""
    if width == 1.0:
        return channels
    scaled = max(divisor, int(channels * width + divisor / 2) // divisor * divisor)
    return max(4, scaled)


def _init_like_torchvision(module: nn.Module) -> None:
    """torchvision's VGG/ResNet initialisation, applied to layers this module replaces."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _vgg16_bn(num_classes: int, stem: str, width: float) -> nn.Module:
    if stem == "imagenet" and width == 1.0:
        return torchvision.models.vgg16_bn(weights=None, num_classes=num_classes)
    cfg: list[int | str] = [
        v if v == "M" else scale_channels(int(v), width) for v in tv_vgg.cfgs["D"]
    ]
    if stem == "cifar":
        # Three poolings (total stride 8, like the other cifar stems): the last block sees 4x4
        # maps at 32px; on 1x1 maps BatchNorm's batch statistics diverge from running ones.
        last_pools = [i for i, v in enumerate(cfg) if v == "M"][-2:]
        cfg = [v for i, v in enumerate(cfg) if i not in last_pools]
    features = tv_vgg.make_layers(cfg, batch_norm=True)
    last = int([v for v in cfg if v != "M"][-1])
    if stem == "cifar":
        avgpool: nn.Module = nn.AdaptiveAvgPool2d(1)
        classifier: nn.Module = nn.Sequential(nn.Linear(last, num_classes))
    else:
        hidden = scale_channels(4096, width)
        avgpool = nn.AdaptiveAvgPool2d((7, 7))
        classifier = nn.Sequential(
            nn.Linear(last * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )
    with torch.device("meta"):  # the shell's own oversized head is never materialised
        model = tv_vgg.VGG(nn.Sequential(), num_classes=num_classes, init_weights=False)
    model.features, model.avgpool, model.classifier = features, avgpool, classifier
    _init_like_torchvision(model)
    return model


class _WidthResNet(tv_resnet.ResNet):
    """torchvision's ResNet with every stage's width scaled (torchvision hard-codes 64..512)."""

    def __init__(self, layers: list[int], num_classes: int, width: float) -> None:
        self._width = width
        self._stem_set = False
        super().__init__(tv_resnet.Bottleneck, layers, num_classes=num_classes)
        stem = scale_channels(64, width)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.fc = nn.Linear(scale_channels(512, width) * tv_resnet.Bottleneck.expansion, num_classes)
        _init_like_torchvision(self.conv1)
        _init_like_torchvision(self.bn1)
        self.fc.reset_parameters()

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[no-untyped-def]
        if not self._stem_set:  # first stage: its input is the (scaled) stem
            self.inplanes = scale_channels(64, self._width)
            self._stem_set = True
        return super()._make_layer(block, scale_channels(planes, self._width), blocks, stride, dilate)


def _resnet50(num_classes: int, stem: str, width: float) -> nn.Module:
    if width == 1.0:
        model: nn.Module = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    else:
        model = _WidthResNet([3, 4, 6, 3], num_classes, width)
    if stem == "cifar":
        out = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, out, kernel_size=3, stride=1, padding=1, bias=False)
        _init_like_torchvision(model.conv1)
        model.maxpool = nn.Identity()
    return model


def _mobilenet_v2(num_classes: int, stem: str, width: float) -> nn.Module:
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    if stem == "cifar":
        setting[1][3] = 1  # keep 24-channel stage at full resolution (total stride 8)
    model = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting)
    if stem == "cifar":
        model.features[0][0].stride = (1, 1)
    return model


_REFERENCE_BUILDERS: dict[str, Callable[[int, str, float], nn.Module]] = {
    "vgg16_bn": _vgg16_bn,
    "resnet50": _resnet50,
    "mobilenet_v2": _mobilenet_v2,
}


def build_model(arch: str, num_classes: int, stem: str = "imagenet", width: float = 1.0) -> nn.Module:
    """Build a randomly initialised classification model (no weights are ever downloaded).

    Args:
        arch: ``vgg16_bn``, ``resnet50``, ``mobilenet_v2`` or any torchvision classification
            model name (those only at ``stem="imagenet"``, ``width=1``).
        num_classes: size of the classifier's output.
        stem: ``imagenet`` (torchvision as is) or ``cifar`` (small-input stem).
        width: channel multiplier, ``0 < width <= 1`` typically.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {list(STEMS)}, got {stem!r}")
    if not (0 < width <= 4):
        raise ValueError(f"width must be in (0, 4], got {width}")
    if arch in _REFERENCE_BUILDERS:
        model = _REFERENCE_BUILDERS[arch](num_classes, stem, width)
    else:
        model = _build_torchvision(arch, num_classes, stem, width)
    setattr(model, SPEC_ATTR, ModelSpec(arch, num_classes, stem, width))
    return model


def _build_torchvision(arch: str, num_classes: int, stem: str, width: float) -> nn.Module:
    if arch not in classification_archs():
        raise ValueError(
            f"unknown arch {arch!r}: use one of {list(REFERENCE_ARCHS)} or a torchvision "
            "classification model name (torchvision.models.list_models(module=torchvision.models))"
        )
    if stem != "imagenet" or width != 1.0:
        raise ValueError(
            f"arch {arch!r} is supported at stem='imagenet', width=1 only "
            f"(stem/width variants exist for {list(REFERENCE_ARCHS)})"
        )
    kwargs = dict(_EXTRA_KWARGS.get(arch, {}))
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model has at least one BatchNorm2d layer (network slimming needs them)."""
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


__all__ = [
    "PLAN_ATTR", "REFERENCE_ARCHS", "SPEC_ATTR", "STEMS", "ModelSpec", "build_model", "classification_archs",
    "has_batchnorm", "min_image_size", "scale_channels", "spec_of",
]
