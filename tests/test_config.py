"""params.yaml validation: the repo's files load, and every bad value fails naming its key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from slimcore.archs import REFERENCE_ARCHS, classification_archs, min_image_size
from slimcore.errors import SlimcoreError
from slimcore_pipeline.config import (
    DATASETS,
    DataConfig,
    Params,
    ParamsError,
    TrainConfig,
    load_params,
    parse_params,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"
SEED_FILE = ROOT / "configs" / "seed-cifar100.yaml"


def _raw() -> dict[str, Any]:
    """The repo's params.yaml as a plain mapping (a fresh copy each call)."""
    return yaml.safe_load(PARAMS_FILE.read_text())


def _error(mutate: Callable[[dict[str, Any]], object]) -> str:
    """The ParamsError message for params.yaml after ``mutate``."""
    raw = _raw()
    mutate(raw)
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def _set(dotted: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value

    return mutate


# --------------------------------------------------------------------------------------------
# the repo's files
# --------------------------------------------------------------------------------------------


def test_repo_params_yaml_validates_as_the_cpu_default() -> None:
    params = load_params(PARAMS_FILE)
    assert isinstance(params, Params)
    assert params.archs == list(REFERENCE_ARCHS)
    assert params.data.name == "digits"
    assert params.model.stem == "cifar"
    assert 0 < params.model.width < 1
    assert set(params.penalty.strength) == set(params.archs)
    assert params.prune.targets == sorted(params.prune.targets)  # the default: ratios only
    assert all(t.kind == "ratio" and 0 <= t.value < 1 for t in params.prune.parsed_targets())
    assert params.prune.warn_gamma == pytest.approx(1e-2)
    for arch in params.archs:
        assert params.data.image_size >= min_image_size(arch, params.model.stem)


def test_seed_config_validates_as_the_seed_setup() -> None:
    params = load_params(SEED_FILE)
    assert params.archs == ["vgg16_bn", "resnet50", "mobilenet_v2"]
    assert (params.data.name, params.data.image_size) == ("cifar100", 224)
    assert (params.model.stem, params.model.width) == ("imagenet", 1.0)
    assert (params.train.epochs, params.train.lr, params.train.warmup_epochs) == (100, 0.05, 5)
    assert params.train.milestones == [40, 60, 80]
    assert params.train.weight_decay == pytest.approx(1e-4)
    assert params.penalty.strength == pytest.approx({"vgg16_bn": 1e-4, "resnet50": 1e-5, "mobilenet_v2": 1e-5})
    assert params.prune.targets == [0.2, 0.4, 0.6]
    assert params.runtime.amp == "bf16"


def test_the_two_files_have_the_same_keys() -> None:
    """The seed config is meant to replace params.yaml as is: same sections, same keys."""
    ours, seed = yaml.safe_load(PARAMS_FILE.read_text()), yaml.safe_load(SEED_FILE.read_text())
    assert set(ours) == set(seed)
    for section, value in ours.items():
        if isinstance(value, dict):
            assert set(value) == set(seed[section]), section


def test_loading_params_does_not_import_torch() -> None:
    """Stages validate params before importing torch: a bad file fails in a fraction of a second."""
    code = ("import sys; from slimcore_pipeline.config import load_params; "
            "load_params('params.yaml'); load_params('configs/seed-cifar100.yaml'); "
            "print('torch' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["False", "False"]


def test_torchvision_names_are_checked_without_importing_torch() -> None:
    """A torchvision arch, and an unknown one, are told apart from the sources, not by importing them."""
    code = ("import sys; from slimcore_pipeline.config import parse_params, ParamsError\n"
            "raw = {'archs': ['resnet18'], 'penalty': {'strength': {'resnet18': 1e-5}},\n"
            "       'model': {'stem': 'imagenet', 'width': 1.0}, 'data': {'image_size': 32}}\n"
            "parse_params(raw)\n"
            "try:\n"
            "    parse_params({**raw, 'archs': ['resnet181'], 'penalty': {'strength': {'resnet181': 1e-5}}})\n"
            "except ParamsError as err:\n"
            "    print('refused' if 'resnet181' in str(err) else 'unnamed')\n"
            "print('torch' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["refused", "False", "False"]


def test_known_arch_names_are_exactly_torchvisions_classifiers() -> None:
    import torchvision

    assert set(classification_archs()) == set(torchvision.models.list_models(module=torchvision.models))


def test_a_minimal_file_needs_only_the_strengths_and_gets_the_defaults() -> None:
    params = parse_params({"penalty": {"strength": dict.fromkeys(REFERENCE_ARCHS, 1e-4)}})
    assert params.archs == list(REFERENCE_ARCHS)
    assert params.data == DataConfig()
    assert params.train == TrainConfig()
    assert params.finetune == TrainConfig()


def test_every_dataset_name_is_accepted() -> None:
    for name in DATASETS:
        assert DataConfig(name=name).name == name


def test_params_are_immutable() -> None:
    params = load_params(PARAMS_FILE)
    with pytest.raises(pydantic.ValidationError):
        params.train.epochs = 3  # type: ignore[misc]


def test_yaml_exponent_without_a_dot_is_still_a_float() -> None:
    """PyYAML reads ``1e-4`` as a string (YAML 1.1); validation must still give the float."""
    text = PARAMS_FILE.read_text().replace("vgg16_bn: 0.15", "vgg16_bn: 1e-4")
    assert "vgg16_bn: 1e-4" in text
    params = parse_params(yaml.safe_load(text))
    assert params.penalty.strength["vgg16_bn"] == pytest.approx(1e-4)
    assert isinstance(params.penalty.strength["vgg16_bn"], float)


# --------------------------------------------------------------------------------------------
# invalid values: the message names the dotted key and, for fixed sets, what is allowed
# --------------------------------------------------------------------------------------------

INVALID: dict[str, tuple[Callable[[dict[str, Any]], object], list[str]]] = {
    "unknown top-level key": (
        _set("bogus", 1),
        ["params.yaml: bogus: unknown key",
         "seed, models, archs, data, model, train, penalty, prune, finetune"],
    ),
    "unknown nested key": (
        _set("train.bogus", 1),
        ["train.bogus: unknown key", "epochs, batch_size, lr, momentum"],
    ),
    "unknown key in another section": (
        _set("data.imagesize", 32),
        ["data.imagesize: unknown key", "name, root, download, image_size, test_fraction"],
    ),
    "misspelt section": (
        lambda raw: raw.update(runtim=raw.pop("runtime")),
        ["runtim: unknown key", "runtime"],
    ),
    "string for an int": (_set("train.epochs", "ten"), ["train.epochs", "integer", "'ten'"]),
    "fractional int": (_set("finetune.batch_size", 2.5), ["finetune.batch_size", "integer", "2.5"]),
    "string for a bool": (_set("data.download", "maybe"), ["data.download", "boolean", "'maybe'"]),
    "string for a list": (_set("archs", "vgg16_bn"), ["archs", "list"]),
    "string for a float": (_set("train.lr", "fast"), ["train.lr", "'fast'"]),
    "ratio of 1": (_set("prune.targets", [0.2, 1.0]), ["prune.targets", "entry 1", "[0, 1)", "1.0"]),
    "negative ratio": (_set("prune.targets", [-0.1]), ["prune.targets", "entry 0", "[0, 1)", "-0.1"]),
    "empty target list": (_set("prune.targets", []), ["prune.targets", "at least 1"]),
    "integer ratio": (_set("prune.targets", [0, 0.2]), ["prune.targets", "decimal", "0.0, not 0"]),
    "duplicate ratio": (_set("prune.targets", [0.2, 0.2]), ["prune.targets", "unique", "0.2"]),
    "duplicate safe": (_set("prune.targets", ["safe", 0.2, "safe"]), ["prune.targets", "unique", "safe"]),
    "unknown target": (_set("prune.targets", [0.2, "latency0.5"]), ["prune.targets", "entry 1", "unknown target",
                                                                      "flopsF", "paramsF", "safe"]),
    "misspelt target": (_set("prune.targets", ["flop0.5"]), ["prune.targets", "unknown target"]),
    "FLOPs fraction of 1": (_set("prune.targets", ["flops1.0"]), ["prune.targets", "flops1.0", "0 < F < 1"]),
    "zero params fraction": (_set("prune.targets", ["params0.0"]), ["prune.targets", "0 < F < 1"]),
    "padded fraction": (_set("prune.targets", ["flops0.50"]), ["prune.targets", "write it 'flops0.5'"]),
    "quoted ratio": (_set("prune.targets", ["0.20"]), ["prune.targets", "write it '0.2'"]),
    "integer fraction": (_set("prune.targets", ["flops1"]), ["prune.targets", "0 < F < 1"]),
    "speed-up of 1": (_set("prune.targets", ["speedup1"]), ["prune.targets", "speedup1", "1 < S <= 1000"]),
    "speed-up below 1": (_set("prune.targets", ["speedup0.5"]), ["prune.targets", "MAC speed-up",
                                                                 "write flops0.5"]),
    "speed-up with .0": (_set("prune.targets", ["speedup2.0"]), ["prune.targets", "write it 'speedup2'"]),
    "padded speed-up": (_set("prune.targets", ["speedup1.50"]), ["prune.targets", "write it 'speedup1.5'"]),
    "speed-up in exponent form": (_set("prune.targets", ["speedup1e1"]), ["prune.targets", "write it 'speedup10'"]),
    "speed-up with no number": (_set("prune.targets", ["speedup"]), ["prune.targets", "unknown target",
                                                                     "speedupS"]),
    "duplicate speed-up": (_set("prune.targets", ["speedup2", "speedup2"]), ["prune.targets", "unique", "speedup2"]),
    "renamed ratios": (lambda raw: raw["prune"].update(ratios=raw["prune"].pop("targets")),
                       ["prune", "prune.ratios was renamed to prune.targets"]),
    "negative warn_gamma": (_set("prune.warn_gamma", -1.0), ["prune.warn_gamma", "greater than or equal to 0"]),
    "negative lr": (_set("train.lr", -0.1), ["train.lr", "greater than 0", "-0.1"]),
    "zero lr in finetune": (_set("finetune.lr", 0.0), ["finetune.lr", "greater than 0"]),
    "zero epochs": (_set("train.epochs", 0), ["train.epochs", "greater than 0", "(got 0)"]),
    "negative epochs": (_set("finetune.epochs", -3), ["finetune.epochs", "greater than 0", "-3"]),
    "negative weight decay": (_set("train.weight_decay", -1e-4), ["train.weight_decay"]),
    "momentum of 1": (_set("finetune.momentum", 1.0), ["finetune.momentum", "less than 1"]),
    "test fraction of 1": (_set("data.test_fraction", 1.0), ["data.test_fraction", "less than 1"]),
    "zero width": (_set("model.width", 0), ["model.width", "greater than 0"]),
    "negative seed": (_set("seed", -1), ["seed", "greater than or equal to 0"]),
    "unknown arch": (
        _set("archs", ["vgg16_bn", "vgg99_nope"]),
        ["archs", "'vgg99_nope'", "vgg16_bn, resnet50, mobilenet_v2", "torchvision"],
    ),
    "duplicate arch": (_set("archs", ["resnet50", "resnet50"]), ["archs", "unique"]),
    "empty arch list": (_set("archs", []), ["archs", "at least 1"]),
    "unknown dataset": (
        _set("data.name", "imagenet"),
        ["data.name", "'imagenet'", "'digits'", "'fashionmnist'", "'svhn'", "'cifar10'", "'cifar100'", "'imagefolder'"],
    ),
    "unknown stem": (_set("model.stem", "tiny"), ["model.stem", "'tiny'", "'imagenet'", "'cifar'"]),
    "unknown device": (_set("runtime.device", "tpu"), ["runtime.device", "'auto'", "'cpu'", "'cuda'"]),
    "unknown amp": (_set("runtime.amp", "fp8"), ["runtime.amp", "'off'", "'bf16'", "'fp16'"]),
    "unknown group score": (_set("prune.group_score", "min"), ["prune.group_score", "'max'", "'mean'", "'l2'"]),
    "image too small for the cifar stem": (
        _set("data.image_size", 4),
        ["data.image_size", "4 is too small for vgg16_bn", "stem=cifar", ">= 8"],
    ),
    "image too small for the imagenet stem": (
        lambda raw: (_set("model.stem", "imagenet")(raw), _set("data.image_size", 16)(raw)),
        ["data.image_size", "16 is too small", "stem=imagenet", ">= 32"],
    ),
    "strength missing for an arch": (
        lambda raw: raw["penalty"]["strength"].pop("resnet50"),
        ["penalty.strength.resnet50: missing"],
    ),
    "negative strength": (_set("penalty.strength.mobilenet_v2", -1e-4),
                          ["penalty.strength.mobilenet_v2", "greater than or equal"]),
    "torchvision arch at the cifar stem ignores it": (
        lambda raw: (_set("archs", ["resnet18"])(raw), raw["penalty"]["strength"].update(resnet18=1e-5)),
        ["data.image_size", "16 is too small for resnet18", "stem=imagenet",
         "model.stem/width apply to the reference archs only", ">= 32"],
    ),
    "milestones out of order": (_set("train.milestones", [8, 6]), ["train", "milestones", "increasing"]),
    "milestone past the last epoch": (_set("finetune.milestones", [3]), ["finetune", "milestones", "< epochs (3)"]),
    "warmup as long as training": (
        _set("finetune.warmup_epochs", 3),
        ["finetune", "warmup_epochs (3) must be < epochs (3)"],
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_value_names_the_key(case: str) -> None:
    mutate, expected = INVALID[case]
    message = _error(mutate)
    assert message.startswith("params.yaml: "), message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_unknown_arch_suggests_close_names() -> None:
    message = _error(_set("archs", ["resnet5O"]))
    assert "archs: unknown arch 'resnet5O' (did you mean resnet50" in message
    message = _error(_set("archs", ["zzzzzz"]))
    assert "did you mean" not in message and "'zzzzzz'" in message


def test_every_problem_gets_its_own_line() -> None:
    def mutate(raw: dict[str, Any]) -> None:
        raw["train"]["bogus"] = 1
        raw["data"]["name"] = "imagenet"
        raw["prune"]["targets"] = [1.5]

    lines = _error(mutate).splitlines()
    assert len(lines) == 3
    assert any(line.startswith("params.yaml: train.bogus: ") for line in lines)
    assert any(line.startswith("params.yaml: data.name: ") for line in lines)
    assert any(line.startswith("params.yaml: prune.targets: entry 0: ") for line in lines)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params([1, 2])
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params(None)


def test_params_error_is_the_users_error_class() -> None:
    assert issubclass(ParamsError, SlimcoreError)
    assert issubclass(ParamsError, ValueError)


def test_torchvision_arch_is_accepted_at_imagenet_width_1() -> None:
    raw = _raw()
    raw["archs"] = ["resnet18", "efficientnet_b0"]
    raw["penalty"]["strength"] = {"resnet18": 1e-5, "efficientnet_b0": 1e-5}
    raw["model"] = {"stem": "imagenet", "width": 1.0}
    raw["data"]["image_size"] = 32
    params = parse_params(raw)
    assert params.archs == ["resnet18", "efficientnet_b0"]


def test_inception_needs_its_own_minimum_size() -> None:
    raw = _raw()
    raw["archs"] = ["inception_v3"]
    raw["penalty"]["strength"] = {"inception_v3": 1e-5}
    raw["model"] = {"stem": "imagenet", "width": 1.0}
    raw["data"]["image_size"] = min_image_size("inception_v3", "imagenet") - 1
    with pytest.raises(ParamsError, match=r"data\.image_size: 74 is too small for inception_v3.*>= 75"):
        parse_params(raw)
    raw["data"]["image_size"] = 75
    assert parse_params(raw).data.image_size == 75


# --------------------------------------------------------------------------------------------
# load_params: files
# --------------------------------------------------------------------------------------------


def test_load_names_the_file_in_errors(tmp_path: Path) -> None:
    raw = _raw()
    raw["train"]["epochs"] = 0
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as info:
        load_params(file)
    assert str(info.value).startswith(f"{file}: train.epochs: ")


def test_missing_file_is_a_params_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match="params file not found") as info:
        load_params(missing)
    assert str(missing) in str(info.value)


def test_invalid_yaml_and_empty_file_are_params_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML") as info:
        load_params(broken)
    assert str(broken) in str(info.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(empty)


def test_edits_to_the_file_are_seen(tmp_path: Path) -> None:
    """load_params caches, but never returns the old contents of an edited file."""
    file = tmp_path / "params.yaml"
    raw = _raw()
    file.write_text(yaml.safe_dump(raw))
    os.utime(file, ns=(1_000_000_000, 1_000_000_000))
    assert load_params(file).seed == 0
    raw["seed"] = 7
    file.write_text(yaml.safe_dump(raw))
    os.utime(file, ns=(2_000_000_000, 2_000_000_000))
    assert load_params(file).seed == 7
    assert load_params(str(file)).seed == 7


# --------------------------------------------------------------------------------------------
# with_overrides: stage options
# --------------------------------------------------------------------------------------------


def test_overrides_apply_and_none_means_unset() -> None:
    params = load_params(PARAMS_FILE)
    new = with_overrides(params, {"train.lr": 0.05, "finetune.epochs": 4, "train.epochs": None})
    assert new.train.lr == 0.05
    assert new.finetune.epochs == 4
    assert new.train.epochs == params.train.epochs
    assert params.train.lr == 0.1  # the original is untouched
    assert new.model_dump() == {**params.model_dump(), "train": {**params.train.model_dump(), "lr": 0.05},
                                "finetune": {**params.finetune.model_dump(), "epochs": 4}}


def test_overrides_are_validated_and_blamed_on_options() -> None:
    params = load_params(PARAMS_FILE)
    with pytest.raises(ParamsError, match=r"^options: train\.epochs: Input should be greater than 0"):
        with_overrides(params, {"train.epochs": 0})
    with pytest.raises(ParamsError, match=r"^options: train\.bogus: unknown key"):
        with_overrides(params, {"train.bogus": 1})
    # an epoch override that the schedule cannot hold is refused, naming the schedule
    with pytest.raises(ParamsError, match=r"options: train: milestones must be < epochs \(3\)"):
        with_overrides(params, {"train.epochs": 3})


@pytest.mark.parametrize("written,kind,value,tag,label", [
    (0.2, "ratio", 0.2, "0.2", "20%"),
    (0.0, "ratio", 0.0, "0.0", "0%"),
    ("flops0.5", "flops", 0.5, "flops0.5", "FLOPs 50%"),
    ("params0.3", "params", 0.3, "params0.3", "params 30%"),
    ("speedup2", "speedup", 2.0, "speedup2", "speed-up 2x"),
    ("speedup1.5", "speedup", 1.5, "speedup1.5", "speed-up 1.5x"),
    ("safe", "safe", None, "safe", "safe"),
])
def test_targets_parse_to_their_names_and_labels(written: object, kind: str, value: float | None, tag: str,
                                                 label: str) -> None:
    from slimcore.targets import parse_target

    raw = yaml.safe_load(PARAMS_FILE.read_text())
    raw["prune"]["targets"] = [written]
    params = parse_params(raw)
    (target,) = params.prune.parsed_targets()
    assert (target.kind, target.value, target.tag, target.label()) == (kind, value, tag, label)
    assert params.prune.targets == [written]  # held as written: DVC's matrix reads the same values
    assert parse_target(tag) == target  # a stage's --target TAG is the same target
    if kind == "safe":
        assert target.label(0.45) == "safe (45%)"


def test_a_speedup_target_keeps_one_over_s_of_the_flops_and_sorts_with_them() -> None:
    from slimcore.targets import parse_target, parse_targets

    assert parse_target("speedup2").flops_fraction == 0.5 == parse_target("flops0.5").flops_fraction
    assert parse_target("speedup1.5").flops_fraction == pytest.approx(2 / 3)
    assert parse_target("params0.5").flops_fraction is None and parse_target("safe").flops_fraction is None
    assert parse_target("speedup4").yaml_value == "speedup4"  # params.yaml and DVC hold the name
    ordered = sorted(parse_targets(["safe", "params0.3", "speedup4", "flops0.6", "speedup1.5", 0.2]),
                     key=lambda t: t.sort_key())
    assert [t.tag for t in ordered] == ["0.2", "speedup1.5", "flops0.6", "speedup4", "params0.3", "safe"]


def test_prune_policy_is_what_slim_accepts() -> None:
    from slimcore.prune import SlimPolicy

    policy = load_params(PARAMS_FILE).prune.policy()
    assert "targets" not in policy and "max_drop" not in policy and policy["warn_gamma"] == pytest.approx(1e-2)
    SlimPolicy.from_kwargs(**policy)  # no unknown key


# --------------------------------------------------------------------------------------------
# renamed keys: the old name still loads, with one line naming the new one
# --------------------------------------------------------------------------------------------


def test_the_old_top_level_sparsity_still_loads_with_one_warning_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _raw()
    strengths = raw["penalty"].pop("strength")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({**raw, "sparsity": strengths}, sort_keys=False))
    params = load_params(old)
    assert params == load_params(PARAMS_FILE)
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1, said
    assert said[0].startswith(f"warning: {old}: sparsity is now penalty.strength: "), said


def test_a_file_with_both_the_old_and_the_new_key_is_refused_naming_both() -> None:
    raw = _raw()
    raw["sparsity"] = dict(raw["penalty"]["strength"])
    with pytest.raises(ParamsError, match=r"^params\.yaml: sparsity and penalty\.strength: both set; .*keep only "
                                          r"penalty\.strength$"):
        parse_params(raw)
