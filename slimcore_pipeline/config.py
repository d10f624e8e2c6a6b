"""Typed, validated view of ``params.yaml``: the one source of pipeline settings.

Every stage calls :func:`load_params` first, so a bad value fails at once, before any
artifact is touched, with a message that names the key and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from slimcore.archs import (
    REFERENCE_ARCHS,
    SHORT_NAME,
    STEMS,
    arch_string,
    check_name,
    classification_archs,
    has_batchnorm,
    is_known_arch,
    min_image_size,
    uses_stem_and_width,
)
from slimcore.errors import ParamsError
from slimcore.targets import Target, parse_targets
from slimcore_pipeline.yamlio import AliasBombError, DuplicateKeyError, safe_load_unique

DEFAULT_PARAMS_PATH = Path("params.yaml")
# a params file holds settings (a few KB); beyond this it is refused unread (parsing 1 MB of YAML
# takes seconds, and every stage and `dvc status` reads it)
MAX_PARAMS_BYTES = 256 * 1024
MIN_SENSITIVITY_STEP = 0.01  # the finest sensitivity grid: 99 ratios, each one slim and one validation pass
DATASETS = ("digits", "mnist", "fashionmnist", "kmnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder")
# formats whose images are glyphs (a mirrored digit is another glyph): augment auto never flips them
GLYPH_DATASETS = ("digits", "mnist", "kmnist", "svhn")

MAX_SEED = 2**32 - 1
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


AUGMENTS = ("auto", "none", "flip", "crop+flip", "imagenet")
SMALL_IMAGE_MAX = 64  # pixels: ``augment: auto`` picks crop+flip up to this size, imagenet-style above


class DataConfig(_Section):
    """Which dataset, where it lives, how it is shaped and how training images are augmented.

    ``root`` is a DVC dependency of every stage that reads data (baseline-train, sparse-train, sensitivity,
    finetune, evaluate): a relative path is relative to the project root (the default ``data``
    folder is committed with a README and keeps its contents out of git); an absolute path
    outside the project works too.

    ``name``: ``digits`` (scikit-learn's, embedded), or a format read from ``root`` without
    downloading (see :mod:`slimcore_pipeline.data`): ``mnist``, ``fashionmnist``, ``kmnist`` (idx files,
    ``.gz`` or not, flat in ``root`` as Debian's ``dataset-fashion-mnist`` installs them, or in
    torchvision's ``root/<Class>/raw/``), ``cifar10``, ``cifar100``, ``svhn`` (torchvision's
    ``train_32x32.mat``/``test_32x32.mat``), ``stl10`` (``root/stl10_binary/``), ``imagefolder``.
    Each format's own train/test split is used; grayscale images become 3 identical channels.

    ``train_per_class`` > 0 keeps at most that many images of each class of the format's
    training split (a stratified subset drawn with a fixed seed, 0, whatever ``params.seed``;
    a class with fewer keeps all of its own), *before* the validation split is held out of it.

    ``val_fraction`` of each class's *training* images (never its last one) is held out of
    training as the validation split, drawn with ``params.seed`` (:attr:`split_seed`) and read
    with the evaluation transform: training evaluates it every epoch, the sensitivity stage
    ranks ratios on it; the test split is unaffected.

    ``augment`` (training images only; evaluation never randomises):

    - ``none``: resize (shorter side to ``image_size``) and center crop, nothing random;
    - ``flip``: that, plus a random horizontal flip;
    - ``crop+flip``: that, plus a random crop after padding by ``image_size // 8`` pixels (the
      CIFAR recipe: for small images);
    - ``imagenet``: ``RandomResizedCrop(image_size)`` (8-100% of the area) + flip; evaluation
      resizes to ``1.14 * image_size`` and center crops (the ImageNet recipe: for large images,
      far too strong at a few dozen pixels);
    - ``auto`` (default): ``none`` for glyphs (``digits``, ``mnist``, ``kmnist``, ``svhn``: a
      mirrored digit is another glyph), ``crop+flip`` for ``fashionmnist``, CIFAR and STL-10 at
      any size and for an imagefolder at ``image_size <= 64``, ``imagenet`` for an imagefolder
      above 64 px.  See :meth:`augmentation`.
    """

    name: Literal["digits", "mnist", "fashionmnist", "kmnist", "cifar10", "cifar100", "svhn", "stl10",
                  "imagefolder"] = "digits"
    root: str = "data"
    download: bool = False
    image_size: PositiveInt = 16
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1  # of the training split, held out of training
    train_per_class: NonNegInt = 0  # >0: a stratified subset of the training split, before val (0: all)
    augment: Literal["auto", "none", "flip", "crop+flip", "imagenet"] = "auto"
    # Seed of the validation split (val_fraction of the training split): params.seed, set by
    # Params when it validates (not a key of params.yaml); 0 for a DataConfig built on its own.
    _split_seed: int = PrivateAttr(default=0)

    @property
    def split_seed(self) -> int:
        """The seed :func:`slimcore_pipeline.data.load_splits` draws the validation split with (``params.seed``)."""
        return self._split_seed

    def augmentation(self) -> str:
        """The augmentation actually applied: ``augment`` with ``auto`` resolved (never ``auto``)."""
        if self.augment != "auto":
            return self.augment
        if self.name in GLYPH_DATASETS:
            return "none"
        if self.name != "imagefolder" or self.image_size <= SMALL_IMAGE_MAX:
            return "crop+flip"
        return "imagenet"


class ModelConfig(_Section):
    """How models are built (see :func:`slimcore.models.build_model`) and where training starts.

    ``stem`` and ``width`` shape the three reference archs (vgg16_bn, resnet50, mobilenet_v2)
    only; every other model (torchvision, timm or Python) is built as its source defines it and
    ignores them.  ``weights`` is a folder of ``ARCH.pt`` / ``ARCH.pth`` files (an arch without a
    file starts from random init) or one file for every arch; a state_dict or a slimcore
    checkpoint (see :mod:`slimcore.weights`).  It initialises baseline-train; ``sparse_start``
    says where sparse-train starts: ``scratch`` (random init), ``baseline`` (the trained
    models/ARCH/baseline.pt) or ``weights`` (the weights file itself).
    """

    stem: Literal["imagenet", "cifar"] = "cifar"
    width: Annotated[float, Field(gt=0, le=4)] = 0.25
    weights: Annotated[str, Field(min_length=1)] = "weights"  # slimcore.weights.DEFAULT_WEIGHTS
    sparse_start: Literal["scratch", "baseline", "weights"] = "scratch"


class ModelSource(_Section):
    """One entry of params.yaml's ``models``: a model named by its source.

    ``source: torchvision`` (``name``: a torchvision classification model), ``timm`` (any timm
    model name; checked when the model is built, with close matches, since listing timm's
    models means importing it) or ``python`` (``name``: ``package.module:factory``, called as
    ``factory(num_classes=N, **kwargs)``).
    """

    source: Literal["torchvision", "timm", "python"]
    name: Annotated[str, Field(min_length=1)]
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid_name(self) -> ModelSource:
        check_name(self.source, self.name)
        if self.source == "torchvision" and not is_known_arch(self.name):
            close = difflib.get_close_matches(self.name, classification_archs(), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(f"unknown torchvision model {self.name!r}{hint}")
        if self.source == "torchvision" and not has_batchnorm(self.name):
            raise ValueError(f"{self.name!r} has no BatchNorm2d layers: network slimming ranks channels by BN "
                             "scale factors")
        reserved = sorted({"num_classes", "pretrained"} & set(self.kwargs))
        if reserved:
            raise ValueError(f"kwargs may not set {', '.join(reserved)}: num_classes comes from the data, and "
                             "nothing is downloaded (start from weights with model.weights)")
        return self

    @property
    def arch(self) -> str:
        """The arch string :func:`slimcore.models.build_model` takes for this model."""
        return arch_string(self.source, self.name)


class ModelChoice(BaseModel):
    """What a stage builds for one entry of ``archs`` (see :meth:`Params.model_for`)."""

    model_config = ConfigDict(frozen=True)

    short_name: str  # the entry of archs: stage names and folders under models/ and metrics/
    source: str
    name: str
    kwargs: dict[str, Any]
    stem: str  # effective: model.stem for the reference archs, imagenet for every other model
    width: float  # idem: model.width or 1.0

    @property
    def arch(self) -> str:
        return arch_string(self.source, self.name)


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
    bn_recalibrate_batches: NonNegInt = 8  # after each epoch: BN running stats from this many batches (0: off)
    eval_test: bool = False  # also evaluate the test split after every epoch (the validation split always is)

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
    """The slimming policy (see :func:`slimcore.prune.slim`) and what each prune stage aims at.

    ``targets``: channel ratios (``0.2``), ``flopsF`` / ``paramsF`` (keep the fraction F of the
    unpruned model's FLOPs / parameters), ``speedupS`` (keep 1/S of the FLOPs, thop's MACs) or
    ``safe`` (see :mod:`slimcore.targets`).
    """

    targets: Annotated[list[float | str], Field(min_length=1)] = Field(
        default_factory=lambda: [0.2, 0.4, 0.6]
    )
    round_to: PositiveInt = 1
    min_channels: PositiveInt = 1
    min_keep_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    fold_constants: bool = True
    group_score: Literal["max", "mean", "l2"] = "max"
    on_untraceable: Literal["error", "warn"] = "error"  # warn: keep such a model whole, with a warning
    max_drop: NonNegFloat = 2.0  # pt of validation top-1 a safe ratio may lose before fine-tuning
    warn_gamma: NonNegFloat = 1e-2  # warn when slimming removes channels whose |gamma| score exceeds this
    # the sensitivity stage's grid of ratios: step, 2*step, ... up to 1 - step (0.05: 0.05 ... 0.95)
    sensitivity_step: float = 0.05

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, v: object) -> object:
        if isinstance(v, dict) and "ratios" in v:
            raise ValueError("prune.ratios was renamed to prune.targets (same values: ratios as decimals; "
                             "also flopsF, paramsF, speedupS or safe)")
        return v

    @field_validator("sensitivity_step")
    @classmethod
    def _grid(cls, v: float) -> float:
        if not MIN_SENSITIVITY_STEP <= v <= 0.5:  # NaN fails too
            raise ValueError(f"must be in [{MIN_SENSITIVITY_STEP}, 0.5]: the grid slims and evaluates the model "
                             f"once per ratio, so {MIN_SENSITIVITY_STEP} already means "
                             f"{round(1 / MIN_SENSITIVITY_STEP) - 1} runs; use e.g. 0.05 (19 ratios)")
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _parse(cls, v: object) -> object:
        if not isinstance(v, list):
            return v
        try:
            return [t.yaml_value for t in parse_targets(v)]
        except ValueError as err:
            raise ValueError(str(err)) from None

    def parsed_targets(self) -> list[Target]:
        """``targets`` as :class:`slimcore.targets.Target` objects, in the order written."""
        return parse_targets(list(self.targets))

    def policy(self) -> dict[str, Any]:
        """The keyword arguments of :func:`slimcore.prune.slim` (the slimming policy): every key
        but what the stages read themselves (targets, the safe ratio's budget, the sensitivity grid)."""
        return self.model_dump(exclude={"targets", "max_drop", "sensitivity_step"})


class PenaltyConfig(_Section):
    """The penalty sparse-train puts on BN gammas (see :mod:`slimcore.penalty`).

    ``strength``: per arch, the penalty's strength (every arch in ``archs`` needs one).
    ``group`` (default): the proximal step of a group lasso over the channels ``slim`` removes
    together, so residual groups reach zero as a whole; ``prox``: the proximal L1 step per
    gamma; ``l1``: the paper's subgradient through momentum (the seed's recipe; its strengths are
    about 10x smaller than the proximal methods' for the same pull).  ``ramp_epochs`` grows the
    strength linearly from zero over that many epochs.  ``target`` (``prox``/``group``): shrink
    only the units of lowest |gamma| holding this share of all BN channels; ``auto`` derives it
    from ``prune.targets`` on the model sparse training starts from
    (:func:`slimcore.penalty_target.share_for_targets`); 0 shrinks every channel (the paper).
    """

    strength: dict[str, NonNegFloat] = Field(  # the seed's strengths for the reference archs
        default_factory=lambda: {"vgg16_bn": 1e-4, "resnet50": 1e-5, "mobilenet_v2": 1e-5}
    )
    method: Literal["group", "prox", "l1"] = "group"
    ramp_epochs: NonNegFloat = 0.0
    target: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"] = 0.0
    # with a target: the targeted channels fade linearly to exactly zero over sparse-train's last close_epochs
    # epochs (0: off), so a gentle strength still leaves pruning at the target lossless
    close_epochs: NonNegFloat = 0.0


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
    cpu_isa: Literal["avx2", "native"] = "avx2"  # slimcore_pipeline/cpumath.py


class Params(_Section):
    """All of params.yaml."""

    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0  # NumPy's seeds are 32-bit
    # before archs: pydantic validates fields in this order, and archs may name keys of models
    models: dict[str, ModelSource] = Field(default_factory=dict)  # short name -> source/name/kwargs
    archs: Annotated[list[str], Field(min_length=1)] = Field(
        default_factory=lambda: list(REFERENCE_ARCHS)
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    penalty: PenaltyConfig = Field(default_factory=PenaltyConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: TrainConfig = Field(default_factory=TrainConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("models")
    @classmethod
    def _short_names(cls, v: dict[str, ModelSource]) -> dict[str, ModelSource]:
        for key in v:
            if not SHORT_NAME.match(key):
                raise ValueError(f"{key!r}: a short name becomes a DVC stage name and a folder name: use letters, "
                                 "digits, '_', '.' and '-' only (not first: '.' or '-')")
        return v

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if "models" not in info.data:
            return v  # models itself is invalid (reported there): its keys are unknown
        for arch in v:
            if arch in info.data["models"]:
                continue  # validated as a models entry
            if not is_known_arch(arch):
                close = difflib.get_close_matches(arch, classification_archs(), n=3)
                hint = f" (did you mean {' or '.join(close)}?)" if close else ""
                raise ValueError(
                    f"unknown arch {arch!r}{hint}; allowed: {', '.join(REFERENCE_ARCHS)}, any "
                    "torchvision classification model name, or a key of models (timm, python or torchvision)"
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
        # every stage that loads data holds out the same validation split: seeded by params.seed
        self.data._split_seed = self.seed
        for arch in self.archs:
            choice = self.model_for(arch)
            if arch not in self.penalty.strength:
                raise ValueError(
                    f"penalty.strength.{arch}: missing; every arch in archs needs its penalty strength "
                    "(e.g. 1e-4 for VGG, 1e-5 for others in the seed's CIFAR-100 setup)"
                )
            if choice.source != "torchvision":
                continue  # timm / python: the model decides what it accepts (checked when traced)
            need = min_image_size(choice.name, choice.stem)
            if self.data.image_size < need:
                ignored = "" if uses_stem_and_width(choice.source, choice.name) else \
                    " (model.stem/width apply to the reference archs only)"
                raise ValueError(
                    f"data.image_size: {self.data.image_size} is too small for {arch} with "
                    f"stem={choice.stem}{ignored}: it downsamples by {need}, use >= {need}"
                )
        return self

    def model_for(self, arch: str) -> ModelChoice:
        """What to build for ``arch`` (an entry of archs: a key of ``models`` or a torchvision name).

        ``stem``/``width`` are ``model.stem``/``model.width`` for the three reference archs and
        ``imagenet``/``1.0`` (ignored) for every other model.
        """
        entry = self.models.get(arch) or ModelSource(source="torchvision", name=arch)
        shaped = uses_stem_and_width(entry.source, entry.name)
        return ModelChoice(short_name=arch, source=entry.source, name=entry.name, kwargs=dict(entry.kwargs),
                           stem=self.model.stem if shaped else "imagenet",
                           width=self.model.width if shaped else 1.0)


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
    """The pydantic model that holds the key at dotted path ``loc`` (``models.NAME.key``: ModelSource)."""
    model: type[BaseModel] = Params
    parts = loc.split(".")[:-1]
    i = 0
    while i < len(parts):
        field = model.model_fields.get(parts[i])
        ann = field.annotation if field else None
        if typing.get_origin(ann) is dict and i + 1 < len(parts):  # a mapping of sections: skip its key
            ann = typing.get_args(ann)[1]
            i += 1
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
        i += 1
    return model


def _moved_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """``raw`` with the keys of older params files moved to their new place, each move said in
    one warning line on stderr; a file holding both the old and the new key is refused."""
    if "sparsity" not in raw:
        return raw
    penalty = {} if raw.get("penalty") is None else raw["penalty"]
    moved = {key: value for key, value in raw.items() if key != "sparsity"}
    if isinstance(penalty, dict):  # otherwise not a section: reported as such by validation
        if "strength" in penalty:
            raise ParamsError(f"{source}: sparsity and penalty.strength: both set; sparsity is the old name of "
                              "penalty.strength: keep only penalty.strength")
        moved["penalty"] = {"strength": raw["sparsity"], **penalty}
    print(f"warning: {source}: sparsity is now penalty.strength: move the per-arch strengths there "
          "(the old key is read for one more release)", file=sys.stderr)
    return moved


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate a mapping (as read from YAML) into :class:`Params`; raise :class:`ParamsError`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    raw = _moved_keys(raw, source)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> Params:
    file = Path(path)
    size = file.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(f"{path}: {size / 1e6:.1f} MB, over the {MAX_PARAMS_BYTES // 1024} KiB a params file may "
                          "hold (settings take a few KB): move data out of it")
    try:
        raw = safe_load_unique(file.read_text())
    except (DuplicateKeyError, AliasBombError) as err:
        raise ParamsError(f"{path}: {err}") from None
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
    "AUGMENTS",
    "DATASETS",
    "GLYPH_DATASETS",
    "STEMS",
    "DataConfig",
    "ModelChoice",
    "ModelConfig",
    "ModelSource",
    "Params",
    "ParamsError",
    "PenaltyConfig",
    "ProfileConfig",
    "PruneConfig",
    "RuntimeConfig",
    "TrainConfig",
    "load_params",
    "parse_params",
    "with_overrides",
]
