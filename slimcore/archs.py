"""Architecture names and input-size rules; import-light (no torch) so params validate fast."""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

REFERENCE_ARCHS: tuple[str, ...] = ("vgg16_bn", "resnet50", "mobilenet_v2")
STEMS: tuple[str, ...] = ("imagenet", "cifar")

# Total spatial downsampling before global pooling: the smallest input an arch accepts.
_DOWNSAMPLING: dict[tuple[str, str], int] = {
    ("vgg16_bn", "imagenet"): 32,
    ("vgg16_bn", "cifar"): 8,
    ("resnet50", "imagenet"): 32,
    ("resnet50", "cifar"): 8,
    ("mobilenet_v2", "imagenet"): 32,
    ("mobilenet_v2", "cifar"): 8,
}
_OTHER_MIN_SIZE: dict[str, int] = {"inception_v3": 75}
_GENERIC_MIN_SIZE = 32


def min_image_size(arch: str, stem: str) -> int:
    """Smallest square input (pixels) the arch accepts with this stem."""
    return _DOWNSAMPLING.get((arch, stem), _OTHER_MIN_SIZE.get(arch, _GENERIC_MIN_SIZE))


_REGISTERED = re.compile(r"^@register_model\(\)\s*\n(?:@.*\n)*def (\w+)\(", re.MULTILINE)


@functools.cache
def classification_archs() -> tuple[str, ...]:
    """Names of all torchvision classification models.

    Read from torchvision's sources (its ``@register_model()`` builders in ``models/*.py``;
    detection, segmentation and video live in subpackages) without importing torch, so an
    unknown name fails validation in a fraction of a second.  Falls back to importing
    torchvision where the sources cannot be read.
    """
    spec = importlib.util.find_spec("torchvision")
    folders = [Path(p) / "models" for p in (spec.submodule_search_locations or [])] if spec else []
    names = {m.group(1) for folder in folders if folder.is_dir()
             for file in folder.glob("*.py") for m in _REGISTERED.finditer(file.read_text(encoding="utf-8"))}
    if not names:
        import torchvision

        names = set(torchvision.models.list_models(module=torchvision.models))
    return tuple(sorted(names))
# torchvision classification families without BatchNorm2d: nothing for network slimming to rank
# (tests/test_models.py checks this against the models themselves).
_NO_BATCHNORM = re.compile(r"^(alexnet|squeezenet\d_\d|vgg\d+|convnext_\w+|swin_\w+|vit_\w+)$")


def has_batchnorm(arch: str) -> bool:
    """False for torchvision models that have no BatchNorm2d layer (ViT, Swin, ConvNeXt, plain VGG...)."""
    return not _NO_BATCHNORM.match(arch)


def is_known_arch(arch: str) -> bool:
    """True for the reference archs and any torchvision classification model name."""
    return arch in REFERENCE_ARCHS or arch in classification_archs()
