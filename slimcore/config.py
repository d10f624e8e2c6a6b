"""Typed, validated view of ``params.yaml``: the one source of pipeline settings.

Every stage calls :func:`load_params` first, so a bad value fails at once, before any
artifact is touched, with a message that names the key and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimcore.archs import (
    REFERENCE_ARCHS,
    STEMS,
    classification_archs,
    has_batchnorm,
    is_known_arch,
    min_image_size,
)
from slimcore.errors import ParamsError

DEFAULT_PARAMS_PATH = Path("params.yaml")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Ratio = Annotated[float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


AUGMENTS = ("auto", "none", "flip", "crop+flip", "imagenet")
SMALL_IMAGE_MAX = 64  # pixels: ``augment: auto`` picks crop+flip up to this size, imagenet-style above


class DataConfig(_Section):
    """Which dataset, where it lives, how it is shaped and how training images are augmented.

    ``root`` is a DVC dependency of every stage that reads data (baseline-train, sparse-train,
    finetune, evaluate): a relative path is relative to the project root (the default ``data``
    folder is committed with a README and keeps its contents out of git); an absolute path
    outside the project works too.

    ``augment`` (training images only; evaluation never randomises):

    - ``none``: resize (shorter side to ``image_size``) and center crop, nothing random;
    - ``flip``: that, plus a random horizontal flip;
    - ``crop+flip``: that, plus a random crop after padding by ``image_size // 8`` pixels (the
      CIFAR recipe: for small images);
    - ``imagenet``: ``RandomResizedCrop(image_size)`` (8-100% of the area) + flip; evaluation
      resizes to ``1.14 * image_size`` and center crops (the ImageNet recipe: for large images,
      far too strong at a few dozen pixels);
    - ``auto`` (default): ``none`` for ``digits`` (8x8 glyphs: a mirrored digit is another
      glyph), ``crop+flip`` for CIFAR at any size and for an imagefolder at
      ``image_size <= 64``, ``imagenet`` for an imagefolder above 64 px.  See
      :meth:`augmentation`.
    """

    name: Literal["digits", "cifar10", "cifar100", "imagefolder"] = "digits"
    root: str = "data"
    download: bool = False
    image_size: PositiveInt = 16
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    augment: Literal["auto", "none", "flip", "crop+flip", "imagenet"] = "auto"

    def augmentation(self) -> str:
        """The augmentation actually applied: ``augment`` with ``auto`` resolved (never ``auto``)."""
        if self.augment != "auto":
            return self.augment
        if self.name == "digits":
            return "none"
        if self.name in ("cifar10", "cifar100") or self.image_size <= SMALL_IMAGE_MAX:
            return "crop+flip"
        return "imagenet"


class ModelConfig(_Section):
    """How models are built (see :func:`slimcore.models.build_model`)."""

    stem: Literal["imagenet", "cifar"] = "cifar"
    width: Annotated[float, Field(gt=0, le=4)] = 0.25


class TrainConfig(_Section):
    """One training schedule: SGD, linear warmup, then multistep decay."""

    epochs: PositiveInt = 8
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: NonNegFloat = 5e-4
    warmup_epochs: NonNegInt = 1
    milestones: list[PositiveInt] = Field(default_factory=lambda: [5, 7])
    lr_decay: Annotated[float, Field(gt=0, le=1)] = 0.1
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})"
            )
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {self.milestones}")
        if self.milestones and self.milestones[-1] >= self.epochs:
            raise ValueError(f"milestones must be < epochs ({self.epochs}), got {self.milestones}")
        return self


class PruneConfig(_Section):
    """The slimming policy (see :func:`slimcore.prune.slim`)."""

    ratios: Annotated[list[Ratio], Field(min_length=1)] = Field(
        default_factory=lambda: [0.2, 0.4, 0.6]
    )
    round_to: PositiveInt = 1
    min_channels: PositiveInt = 1
    min_keep_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    fold_constants: bool = True
    group_score: Literal["max", "mean", "l2"] = "max"

    @field_validator("ratios", mode="before")
    @classmethod
    def _decimals(cls, v: object) -> object:
        if isinstance(v, list) and any(isinstance(r, int) and not isinstance(r, bool) for r in v):
            raise ValueError(f"write every ratio as a decimal (0.0, not 0): DVC names the prune outputs by "
                             f"the value as written, got {v}")
        return v

    @field_validator("ratios")
    @classmethod
    def _unique(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError(f"ratios must be unique, got {v}")
        return v


class ProfileConfig(_Section):
    """How models are measured."""

    latency_runs: PositiveInt = 30
    warmup_runs: NonNegInt = 5
    threads: PositiveInt = 1


class RuntimeConfig(_Section):
    """How (not what) to compute: device, precision, processes and data loading."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    nproc: PositiveInt = 1
    num_workers: NonNegInt = 0
    pin_memory: Literal["auto", "on", "off"] = "auto"
    persistent_workers: bool = True
    threads: NonNegInt = 0


class Params(_Section):
    """All of params.yaml."""

    seed: NonNegInt = 0
    archs: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: list(REFERENCE_ARCHS)
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sparsity: dict[str, NonNegFloat] = Field(  # the seed's strengths for the reference archs
        default_factory=lambda: {"vgg16_bn": 1e-4, "resnet50": 1e-5, "mobilenet_v2": 1e-5}
    )
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: TrainConfig = Field(default_factory=TrainConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, v: list[str]) -> list[str]:
        for arch in v:
            if not is_known_arch(arch):
                close = difflib.get_close_matches(arch, classification_archs(), n=3)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(
                    f"unknown arch {arch!r}{hint}; allowed: {', '.join(REFERENCE_ARCHS)} or any "
                    "torchvision classification model name"
                )
            if not has_batchnorm(arch):
                raise ValueError(
                    f"{arch!r} has no BatchNorm2d layers: network slimming ranks channels by BN scale "
                    "factors; use a BN model (e.g. vgg16_bn instead of vgg16)"
                )
        if len(set(v)) != len(v):
            raise ValueError(f"archs must be unique, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        for arch in self.archs:
            if arch not in REFERENCE_ARCHS and (self.model.stem != "imagenet" or self.model.width != 1):
                raise ValueError(
                    f"archs: {arch!r} is supported at model.stem=imagenet and model.width=1 only "
                    f"(stem/width variants exist for {', '.join(REFERENCE_ARCHS)})"
                )
            if arch not in self.sparsity:
                raise ValueError(
                    f"sparsity.{arch}: missing; every arch in archs needs its L1 strength "
                    "(e.g. 1e-4 for VGG, 1e-5 for others in the seed's CIFAR-100 setup)"
                )
            need = min_image_size(arch, self.model.stem)
            if self.data.image_size < need:
                raise ValueError(
                    f"data.image_size: {self.data.image_size} is too small for {arch} with "
                    f"stem={self.model.stem}: it downsamples by {need}, use >= {need}"
                )
        return self


def _format_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: key.path: what is wrong (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = _section_for(loc)
            allowed = ", ".join(section.model_fields) if section else ""
            msg = f"unknown key; allowed keys here: {allowed}"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}")
    return "\n".join(lines)


def _section_for(loc: str) -> type[BaseModel] | None:
    """The pydantic model that holds the key at dotted path ``loc``."""
    model: type[BaseModel] = Params
    for part in loc.split(".")[:-1]:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate a mapping (as read from YAML) into :class:`Params`; raise :class:`ParamsError`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> Params:
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, source=str(path))


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate params.yaml; raises :class:`ParamsError` naming the bad key."""
    file = Path(path)
    if not file.is_file():
        raise ParamsError(f"{file}: params file not found (run from the project root)")
    return _load_cached(str(file), file.stat().st_mtime_ns)


def with_overrides(params: Params, overrides: dict[str, object]) -> Params:
    """Return params with dotted-key overrides applied and re-validated (for stage options)."""
    raw = params.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            if not isinstance(node, dict) or key not in node or not isinstance(node[key], dict):
                raise ParamsError(f"{'.'.join(parents[:depth + 1])}: not a section of params; "
                                  f"cannot set {dotted}")
            node = node[key]
        node[leaf] = value
    return parse_params(raw, source="options")


__all__ = [
    "AUGMENTS", "DATASETS", "STEMS", "DataConfig", "ModelConfig", "Params", "ParamsError", "ProfileConfig",
    "PruneConfig", "RuntimeConfig", "TrainConfig", "load_params", "parse_params", "with_overrides",
]
