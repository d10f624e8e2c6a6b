"""Architecture names, model sources and input-size rules; import-light (no torch, no timm)
so params validate fast.

A model is named by a *source* and a *name* (see :func:`parse_arch`):

* ``torchvision``: ``resnet50`` or ``torchvision:resnet50`` (the reference archs and any
  torchvision classification model);
* ``timm``: ``timm:resnet50d`` (any timm model name; checked when the model is built, since
  listing timm's models means importing it);
* ``python``: ``package.module:factory`` (the user's own ``factory(num_classes=..., **kwargs)``).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

REFERENCE_ARCHS: tuple[str, ...] = ("vgg16_bn", "resnet50", "mobilenet_v2")
STEMS: tuple[str, ...] = ("imagenet", "cifar")
SOURCES: tuple[str, ...] = ("torchvision", "timm", "python")

# Short names (params.yaml's ``archs`` / ``models`` keys) become DVC stage names and folder names.
SHORT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# ``package.module:factory`` (the attribute may be dotted: ``module:Class.build``)
PYTHON_PATH = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
# timm model names, optionally with a pretrained tag (``resnet50d.a1_in1k``)
TIMM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def parse_arch(arch: str) -> tuple[str, str]:
    """``(source, name)`` of an arch string.

    ``resnet50`` / ``torchvision:resnet50`` -> ``("torchvision", "resnet50")``;
    ``timm:resnet50d`` -> ``("timm", "resnet50d")``; ``pkg.mod:build`` (or ``python:pkg.mod:build``)
    -> ``("python", "pkg.mod:build")``.  Raises ValueError for a malformed string.
    """
    if not isinstance(arch, str) or not arch.strip():
        raise ValueError(f"arch must be a non-empty string, got {arch!r}")
    prefix, sep, rest = arch.partition(":")
    if sep and prefix in ("torchvision", "timm", "python"):
        source, name = prefix, rest
    elif sep:
        source, name = "python", arch
    else:
        source, name = "torchvision", arch
    check_name(source, name)
    return source, name


def check_name(source: str, name: str) -> None:
    """Raise ValueError when ``name`` cannot be a model of ``source`` (syntax only: no import)."""
    if source not in SOURCES:
        raise ValueError(f"model source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "python" and not PYTHON_PATH.match(name):
        raise ValueError(f"python model {name!r}: expected an import path 'package.module:factory'")
    if source == "timm" and not TIMM_NAME.match(name):
        raise ValueError(f"timm model name {name!r}: expected a name like 'resnet50d'")
    if source == "torchvision" and not SHORT_NAME.match(name):
        raise ValueError(f"torchvision model name {name!r}: expected a name like 'resnet50'")


def arch_string(source: str, name: str) -> str:
    """The arch string :func:`parse_arch` reads back as ``(source, name)``."""
    return {"torchvision": name, "timm": f"timm:{name}", "python": name}[source]


def uses_stem_and_width(source: str, name: str) -> bool:
    """``model.stem`` / ``model.width`` shape the three reference archs only."""
    return source == "torchvision" and name in REFERENCE_ARCHS

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
GENERIC_MIN_SIZE = 32


def min_image_size(arch: str, stem: str) -> int:
    """Smallest square input (pixels) the arch accepts with this stem."""
    return _DOWNSAMPLING.get((arch, stem), _OTHER_MIN_SIZE.get(arch, GENERIC_MIN_SIZE))


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
