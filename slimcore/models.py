"""Model construction from three sources: torchvision, timm and the user's own Python code.

``build_model(arch, num_classes, stem, width, **kwargs)`` is the one place models are made;
``arch`` names the source (see :func:`slimcore.archs.parse_arch`):

* ``"resnet50"`` / ``"torchvision:resnet50"``: torchvision.  For the three reference archs
  ``stem="imagenet"`` is torchvision's model as is (224px inputs; at ``width=1`` exactly
  torchvision's 134.68M / 23.71M / 2.352M parameters at 100 classes), ``stem="cifar"`` adapts
  the stem for small inputs (32px and below: no stride in the first convolution, no stem
  max-pool, a global-pool + single linear head for VGG) and ``width`` scales every channel
  count.  Any other torchvision classification model that uses ``BatchNorm2d`` is accepted by
  name at ``stem="imagenet"`` and ``width=1``.
* ``"timm:resnet50d"``: ``timm.create_model(name, pretrained=False, num_classes=..., **kwargs)``
  (timm is an optional extra: ``pip install slimcore[timm]``).
* ``"package.module:factory"``: ``factory(num_classes=num_classes, **kwargs)``, which must return
  an ``nn.Module`` with ``BatchNorm2d`` layers.

``stem`` and ``width`` shape the reference archs only; timm and Python models are built as
their source defines them (``stem="imagenet"``, ``width=1``).  Nothing is ever downloaded: every
model starts from random initialisation (see :mod:`slimcore.weights` to start from weights).
Every model carries its :class:`ModelSpec`, so :func:`slimcore.checkpoint.save_model` needs
nothing more to save it and :func:`slimcore.checkpoint.load_model` rebuilds it from the same source.
A spec read from a file is checked first (:func:`check_rebuildable`): bounded sizes, and for
torchvision and timm only the keyword arguments of :data:`LOADABLE_KWARGS` (docs/security.md).
"""

from __future__ import annotations

import difflib
import importlib
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg
from torchvision.models.mobilenetv2 import MobileNetV2

from slimcore.archs import (
    GENERIC_MIN_SIZE,
    REFERENCE_ARCHS,
    SOURCES,
    STEMS,
    arch_string,
    check_name,
    classification_archs,
    min_image_size,
    parse_arch,
)
from slimcore.errors import ModelError

# Builders whose auxiliary heads would change the training loop's output type.
_EXTRA_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
SPEC_ATTR = "slimcore_spec"  # every model build_model returns carries its ModelSpec here
PLAN_ATTR = "slimcore_plan"  # and slim() adds its pruning plan (torch-pruning history) here
TRACE_ATTR = "slimcore_trace_size"  # (H, W) of the input its graph was last traced with (slimcore.plan)
TIMM_INSTALL_HINT = "pip install slimcore[timm]"
_RESERVED_KWARGS = ("num_classes", "pretrained")
MAX_NUM_CLASSES = 100_000  # a model rebuilt from a file: larger heads are refused before any allocation


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an unpruned model: stored in every checkpoint.

    ``source`` is ``torchvision``, ``timm`` or ``python``; ``name`` the model's name in that
    source (a ``package.module:factory`` import path for ``python``); ``kwargs`` the extra
    keyword arguments of its builder (plain data: they are saved in checkpoints).
    """

    source: str
    name: str
    num_classes: int
    stem: str = "imagenet"
    width: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", dict(self.kwargs))  # a private copy, never shared

    @classmethod
    def parse(cls, arch: str, num_classes: int, stem: str = "imagenet", width: float = 1.0,
              kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
        """The spec of ``build_model(arch, num_classes, stem, width, **kwargs)``."""
        source, name = parse_arch(arch)
        return cls(source, name, num_classes, stem, width, dict(kwargs or {}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Read :meth:`to_dict`'s output, or a version-1 checkpoint's ``{arch, ...}`` (torchvision)."""
        data = dict(data)
        if "arch" in data and "source" not in data:  # checkpoint version 1: torchvision names only
            data["source"], data["name"] = "torchvision", data.pop("arch")
        return cls(**data)

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "name": self.name, "num_classes": self.num_classes,
                "stem": self.stem, "width": self.width, "kwargs": dict(self.kwargs)}

    @property
    def arch(self) -> str:
        """The arch string that builds this model (``resnet50``, ``timm:resnet50d``, ``pkg.mod:fn``)."""
        return arch_string(self.source, self.name)

    def build(self) -> nn.Module:
        """A freshly (randomly) initialised model of this spec, carrying the spec."""
        _check_arguments(self)
        if self.source == "torchvision":
            model = _build_torchvision(self)
        elif self.source == "timm":
            model = _build_timm(self)
        else:
            model = _build_python(self)
        if self.source != "torchvision":
            problem = batchnorm_problem(model) or input_channels_problem(model, 3)
            if problem:
                raise ModelError(f"{self.source} model {self.name!r} {problem}")
        setattr(model, SPEC_ATTR, self)
        return model

    @property
    def min_image_size(self) -> int:
        """Smallest input the model accepts (torchvision: known; timm/python: a generic 32px)."""
        if self.source == "torchvision":
            return min_image_size(self.name, self.stem)
        return GENERIC_MIN_SIZE

    def example_inputs(self, image_size: int | None = None, batch: int = 1) -> torch.Tensor:
        """A random input batch (default size: :attr:`min_image_size`, cheap to trace)."""
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


def build_model(arch: str, num_classes: int, stem: str | None = None, width: float | None = None,
                **kwargs: Any) -> nn.Module:
    """Build a randomly initialised classification model (no weights are ever downloaded).

    Args:
        arch: ``vgg16_bn``, ``resnet50``, ``mobilenet_v2`` or any torchvision classification
            model name (optionally ``torchvision:NAME``); ``timm:NAME`` for a timm model;
            ``package.module:factory`` for a factory of your own.
        num_classes: size of the classifier's output.
        stem: torchvision models: ``imagenet`` (torchvision as is, the default) or ``cifar``
            (small-input stem, reference archs only).  timm / Python models: a builder argument.
        width: torchvision models: channel multiplier, ``0 < width <= 4`` (default 1; reference
            archs only).  timm / Python models: a builder argument like any other (``width=32``
            reaches ``factory(num_classes, width=32)``).
        **kwargs: extra keyword arguments of the timm / Python builder (or of a non-reference
            torchvision builder).

    Raises:
        ModelError (a ValueError): unknown name (with close matches), timm not installed,
        factory not importable / missing / not returning an ``nn.Module`` / without BatchNorm2d.

    Example:
        >>> model = slimcore.build_model("mobilenet_v2", num_classes=10, stem="cifar", width=0.5)
        >>> model = slimcore.build_model("timm:resnet18d", num_classes=10)      # slimcore[timm]
    """
    try:
        source, name = parse_arch(arch)
    except ValueError as err:
        raise ModelError(str(err)) from None
    if source == "torchvision":
        return ModelSpec(source, name, num_classes, stem or "imagenet", 1.0 if width is None else width,
                         kwargs).build()
    builder_kwargs = {**({"stem": stem} if stem is not None else {}),
                      **({"width": width} if width is not None else {}), **kwargs}
    return ModelSpec(source, name, num_classes, kwargs=builder_kwargs).build()


def _check_arguments(spec: ModelSpec) -> None:
    if spec.source not in SOURCES:
        raise ModelError(f"model source must be one of {', '.join(SOURCES)}, got {spec.source!r}")
    try:
        check_name(spec.source, spec.name)
    except ValueError as err:
        raise ModelError(str(err)) from None
    if not isinstance(spec.num_classes, int) or spec.num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {spec.num_classes}")
    if spec.stem not in STEMS:
        raise ModelError(f"stem must be one of {list(STEMS)}, got {spec.stem!r}")
    if not (0 < spec.width <= 4):
        raise ModelError(f"width must be in (0, 4], got {spec.width}")
    reserved = [k for k in _RESERVED_KWARGS if k in spec.kwargs]
    if reserved:
        raise ModelError(f"{spec.arch}: kwargs may not set {', '.join(reserved)} (num_classes comes from the "
                         "data; nothing is downloaded: start from weights with model.weights / slimcore.weights)")
    if spec.source != "torchvision" and (spec.stem != "imagenet" or spec.width != 1.0):
        raise ModelError(f"{spec.arch}: stem/width shape the reference archs {list(REFERENCE_ARCHS)} only; "
                         f"{spec.source} models are built as their source defines them (stem='imagenet', width=1)")


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    arch, stem, width = spec.name, spec.stem, spec.width
    if arch in _REFERENCE_BUILDERS:
        if spec.kwargs:
            raise ModelError(f"{arch}: the reference archs take no kwargs (got {sorted(spec.kwargs)})")
        return _REFERENCE_BUILDERS[arch](spec.num_classes, stem, width)
    if arch not in classification_archs():
        close = difflib.get_close_matches(arch, classification_archs(), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ModelError(
            f"unknown arch {arch!r}{hint}: use one of {list(REFERENCE_ARCHS)}, a torchvision "
            "classification model name (torchvision.models.list_models(module=torchvision.models)), "
            "timm:NAME or package.module:factory"
        )
    if stem != "imagenet" or width != 1.0:
        raise ModelError(
            f"arch {arch!r} is supported at stem='imagenet', width=1 only "
            f"(stem/width variants exist for {list(REFERENCE_ARCHS)})"
        )
    kwargs = {**_EXTRA_KWARGS.get(arch, {}), **spec.kwargs}
    return torchvision.models.get_model(arch, weights=None, num_classes=spec.num_classes, **kwargs)


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError(f"timm models need the timm package, which is not installed: {TIMM_INSTALL_HINT}") from None
    return timm


def _build_timm(spec: ModelSpec) -> nn.Module:
    timm = _import_timm()
    if not timm.is_model(spec.name):
        close = difflib.get_close_matches(spec.name, timm.list_models(), n=5, cutoff=0.7)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown timm model {spec.name!r}{hint}; timm.list_models() lists them")
    return timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes, **spec.kwargs)


def resolve_factory(path: str) -> Callable[..., Any]:
    """The callable at ``package.module:attr`` (``attr`` may be dotted), with errors naming what failed."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"python model {path!r}: module {module_name!r} is not importable ({err}); install "
                         "its package or run from the folder that holds it") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"python model {path!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"python model {path!r}: {attr} is not callable")
    return target


def _build_python(spec: ModelSpec) -> nn.Module:
    factory = resolve_factory(spec.name)
    try:
        model = factory(num_classes=spec.num_classes, **spec.kwargs)
    except TypeError as err:
        raise ModelError(f"python model {spec.name!r}: calling it with num_classes={spec.num_classes} and "
                         f"kwargs {dict(spec.kwargs)} failed: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"python model {spec.name!r}: the factory returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


# --------------------------------------------------------------------------------------------
# What a checkpoint may ask for (see docs/security.md)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadableArg:
    """A builder keyword argument a checkpoint may set: its type and range, or its choices.

    ``kind`` is ``bool``, ``int``, ``float`` (ints accepted) or ``str``; numbers lie in
    ``[low, high]``; ``choices``, when given, lists every accepted value; ``length > 0`` means
    a list of exactly that many values, each checked as above.
    """

    kind: type
    low: float = 0.0
    high: float = 1.0
    choices: tuple[object, ...] = ()
    length: int = 0

    def accepts(self, value: object) -> bool:
        if self.length:
            return (isinstance(value, (list, tuple)) and len(value) == self.length
                    and all(LoadableArg(self.kind, self.low, self.high, self.choices).accepts(v) for v in value))
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        kinds: tuple[type, ...] = (int, float) if self.kind is float else (self.kind,)
        if not isinstance(value, kinds):
            return False
        if self.choices:
            return value in self.choices
        return isinstance(value, str) or self.low <= value <= self.high  # type: ignore[operator]


_FRACTION = LoadableArg(float, 0.0, 1.0)
_FLAG = LoadableArg(bool)
# Keyword arguments a checkpoint may pass to a torchvision / timm builder: plain values that shape
# the network within bounds.  Never a path, URL, pretrained switch, config override or callable:
# nothing here makes a builder open a file, reach the network or allocate without bound.
LOADABLE_KWARGS: dict[str, dict[str, LoadableArg]] = {
    "torchvision": {
        "dropout": _FRACTION, "drop_rate": _FRACTION, "stochastic_depth_prob": _FRACTION,
        "aux_logits": _FLAG, "init_weights": _FLAG, "transform_input": _FLAG, "zero_init_residual": _FLAG,
        "memory_efficient": _FLAG, "reduced_tail": _FLAG, "dilated": _FLAG,
        "width_mult": LoadableArg(float, 0.05, 4.0), "round_nearest": LoadableArg(int, 1, 64),
        "groups": LoadableArg(int, 1, 64), "width_per_group": LoadableArg(int, 1, 512),
        "bn_size": LoadableArg(int, 1, 16), "replace_stride_with_dilation": LoadableArg(bool, length=3),
    },
    "timm": {
        "drop_rate": _FRACTION, "drop_path_rate": _FRACTION, "drop_block_rate": _FRACTION,
        "global_pool": LoadableArg(str, choices=("avg", "max", "avgmax", "catavgmax", "fast", "")),
        "output_stride": LoadableArg(int, choices=(8, 16, 32)), "in_chans": LoadableArg(int, 1, 16),
        "channel_multiplier": LoadableArg(float, 0.05, 4.0), "depth_multiplier": LoadableArg(float, 0.05, 4.0),
        "stem_type": LoadableArg(str, choices=("", "deep", "deep_tiered")),
    },
}
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 60, 60, 4, 4


def short_repr(value: object) -> str:
    """``repr(value)`` cut to a few dozen characters, on one line (a file's strings may be anything)."""
    return _SHORT.repr(value)


def _is_plain(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _is_plain(v) for k, v in value.items())


def check_rebuildable(spec: ModelSpec, own_kwargs: bool = False) -> None:
    """Raise :class:`ModelError` unless ``spec`` (read from a file) is safe to build: known source,
    well-formed name, ``num_classes`` in ``1..MAX_NUM_CLASSES``, ``width`` in ``(0, 4]``, plain
    kwargs and, for torchvision and timm, only kwargs of :data:`LOADABLE_KWARGS` within their
    bounds.  ``own_kwargs``: the caller chose exactly these kwargs (its own params.yaml entry),
    so they need not be on the allow-list.  Imports nothing and allocates nothing; whether a
    ``python`` source may run is the caller's decision (see :func:`slimcore.checkpoint.load_model`).
    """
    if not isinstance(spec.source, str) or spec.source not in SOURCES:
        raise ModelError(f"model source must be one of {', '.join(SOURCES)}, got {short_repr(spec.source)}")
    if not isinstance(spec.name, str):
        raise ModelError(f"model name must be a string, got {short_repr(spec.name)}")
    try:
        check_name(spec.source, spec.name)
    except ValueError as err:
        raise ModelError(str(err)) from None
    classes = spec.num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or not 1 <= classes <= MAX_NUM_CLASSES:
        raise ModelError(f"num_classes is {short_repr(classes)}, not an integer in 1..{MAX_NUM_CLASSES}")
    if spec.stem not in STEMS:
        raise ModelError(f"stem must be one of {list(STEMS)}, got {short_repr(spec.stem)}")
    if isinstance(spec.width, bool) or not isinstance(spec.width, (int, float)) or not 0 < spec.width <= 4:
        raise ModelError(f"width is {short_repr(spec.width)}, not a number in (0, 4]")
    if not _is_plain(dict(spec.kwargs)):
        raise ModelError(f"kwargs {short_repr(dict(spec.kwargs))} are not plain data")
    allowed = LOADABLE_KWARGS.get(spec.source)
    if allowed is None or own_kwargs:
        return
    for key, value in spec.kwargs.items():
        arg = allowed.get(key)
        if arg is None:
            raise ModelError(f"{spec.arch} kwarg {short_repr(key)} is not one a checkpoint may pass to "
                             f"{spec.source} (allowed: {', '.join(sorted(allowed))})")
        if not arg.accepts(value):
            bound = (f"one of {list(arg.choices)}" if arg.choices else "true or false" if arg.kind is bool
                     else f"a {arg.kind.__name__} in [{arg.low:g}, {arg.high:g}]")
            many = f"{arg.length} values, each " if arg.length else ""
            raise ModelError(f"{spec.arch} kwarg {key}={short_repr(value)} is not {many}{bound}")


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model has at least one BatchNorm2d layer (network slimming needs them)."""
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def batchnorm_problem(model: nn.Module) -> str | None:
    """Why ``model`` has no BatchNorm2d layer with a learnable scale (gamma) for network slimming to
    rank channels by (``has ...: what to do``); None when it has one."""
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if any(m.affine for _, m in bns):
        return None
    sync = [name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if sync:
        return (f"has SyncBatchNorm layers ({len(sync)}: {_some(sync)}) and no BatchNorm2d: slimming ranks "
                "BatchNorm2d scale factors; build it with nn.BatchNorm2d (SyncBatchNorm is a multi-GPU training "
                "wrapper: copy each layer's state_dict into a BatchNorm2d of the same size)")
    if bns:
        return (f"has {len(bns)} BatchNorm2d layers ({_some([n for n, _ in bns])}), all with affine=False: no "
                "learnable scale (gamma) to rank channels by; build them with affine=True")
    return "has no BatchNorm2d layers: network slimming ranks channels by BN scale factors"


def input_channels_problem(model: nn.Module, channels: int, given: str | None = None,
                           fix: str | None = None) -> str | None:
    """Why ``model`` cannot take ``channels``-channel input (its first convolution takes another
    count and no convolution takes ``channels``), else None; ``given`` says what the input is."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs or any(m.in_channels == channels for _, m in convs):
        return None
    name, first = convs[0]
    given = given or f"{channels}-channel images (every dataset is read as RGB, grayscale as 3 equal channels)"
    fix = fix or f"build it with {channels} input channels (in_chans / in_channels)"
    return f"takes {first.in_channels}-channel input (its first convolution {name!r}) but is given {given}: {fix}"


__all__ = [
    "LOADABLE_KWARGS",
    "MAX_NUM_CLASSES",
    "PLAN_ATTR",
    "REFERENCE_ARCHS",
    "SPEC_ATTR",
    "STEMS",
    "TIMM_INSTALL_HINT",
    "TRACE_ATTR",
    "LoadableArg",
    "ModelSpec",
    "batchnorm_problem",
    "build_model",
    "check_rebuildable",
    "classification_archs",
    "has_batchnorm",
    "input_channels_problem",
    "min_image_size",
    "resolve_factory",
    "scale_channels",
    "short_repr",
    "spec_of",
]
