"""docs/own-data.md, followed literally, and the near-chance warning of the training stages.

The slow test builds a small imagefolder of digit PNGs (3 classes) where the page's keys say,
applies exactly the page's ``-S key=value`` pairs to params.yaml (only ``archs`` and the batch size
are reduced, for time), runs ``dvc repro baseline-train@ARCH`` in a scratch git+DVC copy of the
project, checks the model beats chance, then changes one image and sees DVC re-run the stage.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_e2e_dvc import _copy_project, dvc, init_repo, ok, skip_without_dvc_checkout

from slimcore_pipeline.config import parse_params
from stages._training import CHANCE_MARGIN_PT, chance_warning, near_chance

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vgg16_bn"  # the fastest reference arch on CPU
CLASSES = (0, 1, 7)  # digits drawn from scikit-learn's set
N_TRAIN, N_VAL = 30, 10  # per class
STAGE = f"baseline-train@{ARCH}"
KEYS = ("data.name", "data.root", "data.image_size", "data.augment", "train.epochs", "train.milestones")


# --------------------------------------------------------------------------------------------
# the guide's page, as written
# --------------------------------------------------------------------------------------------


def guide_page(name: str = "own-data.md") -> str:
    """A page of docs/ that README links to, whole (README itself stays a screen or two)."""
    readme = (ROOT / "README.md").read_text()
    assert f"(docs/{name})" in readme, f"README does not link to docs/{name}"
    return (ROOT / "docs" / name).read_text()


def readme_settings() -> dict[str, object]:
    """The ``-S key=value`` pairs of the section's ``dvc exp run`` command, values parsed like DVC (YAML)."""
    blocks = re.findall(r"```bash\n(.*?)```", guide_page(), re.DOTALL)
    commands = [b for b in blocks if "dvc exp run" in b and "data.name=imagefolder" in b]
    assert len(commands) == 1, ("expected one `dvc exp run -S data.name=imagefolder` block in "
                                f"docs/own-data.md, got {len(commands)}")
    args = shlex.split(commands[0].replace("\\\n", " "))
    pairs = [args[i + 1] for i, a in enumerate(args) if a == "-S"]
    return {key: yaml.safe_load(value) for key, value in (p.split("=", 1) for p in pairs)}


def apply_settings(params: dict, settings: dict[str, object]) -> dict:
    for dotted, value in settings.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        assert leaf in node, f"docs/own-data.md sets {dotted}, which params.yaml does not have"
        node[leaf] = value
    return params


def test_readme_lists_every_key_for_an_imagefolder() -> None:
    settings = readme_settings()
    assert set(KEYS) <= set(settings), f"docs/own-data.md's command lacks {sorted(set(KEYS) - set(settings))}"
    assert settings["data.name"] == "imagefolder"
    section = guide_page()
    for key in (*KEYS, "model.stem", "archs", "train.batch_size", "finetune.epochs"):
        assert f"`{key}" in section or f"-S {key}" in section or f"'{key}" in section, f"the page omits {key}"
    params = apply_settings(yaml.safe_load((ROOT / "params.yaml").read_text()), settings)
    parse_params(params)  # the keys as the page writes them validate


def write_digit_folder(root: Path, classes: tuple[int, ...] = CLASSES, n_train: int = N_TRAIN,
                       n_val: int = N_VAL) -> None:
    """``root/{train,val}/digitC/*.png``: scikit-learn's 8x8 digits as 16x16 RGB PNGs."""
    from PIL import Image

    from slimcore_pipeline.data import _digits_arrays

    images, labels = _digits_arrays()
    for c in classes:
        for k, i in enumerate(np.flatnonzero(labels == c)[: n_train + n_val]):
            folder = root / ("train" if k < n_train else "val") / f"digit{c}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16), Image.BILINEAR).convert("RGB").save(folder / f"{i:04d}.png")


def test_digit_folder_loads_as_an_imagefolder(tmp_path: Path) -> None:
    from slimcore_pipeline.config import DataConfig
    from slimcore_pipeline.data import load_splits

    write_digit_folder(tmp_path, n_train=3, n_val=2)
    splits = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    # val: data.val_fraction of train/, at least one image per class, held out of training
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (6, 3, 6, 3)
    assert splits.train.classes == [f"digit{c}" for c in CLASSES]


# --------------------------------------------------------------------------------------------
# the near-chance rule
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("top1", "classes", "near"), [
    (0.10, 10, True), (0.149, 10, True), (0.151, 10, False), (0.0, 10, True),  # at, under, over chance + 5 pt
    (0.50, 2, True), (0.549, 2, True), (0.56, 2, False), (0.98, 10, False),
    (0.38, 3, True), (0.39, 3, False), (0.02, 100, True), (0.061, 100, False),
    (math.nan, 10, False), (0.0, 1, False),  # no test set evaluated; one class: no chance to beat
])
def test_near_chance_rule(top1: float, classes: int, near: bool) -> None:
    assert CHANCE_MARGIN_PT == 5.0
    assert near_chance(top1, classes) is near


def _warning(**overrides: object) -> str | None:
    kwargs: dict = dict(top1=0.11, train_top1=0.12, num_classes=10, section="train", epochs=2, lr=0.1,
                        augment="imagenet", image_size=16, dataset="imagefolder")
    kwargs.update(overrides)
    return chance_warning("baseline-train", "vgg16_bn", **kwargs)


def test_chance_warning_names_the_likely_causes() -> None:
    message = _warning()
    assert message is not None
    assert message.startswith("baseline-train@vgg16_bn: validation top-1 11.0% is within 5 pt of chance (10.0% for 10")
    for cause in ("train.epochs = 2", "train.lr = 0.1", "data.augment resolves to imagenet", "16px",
                  "data.root/train/<class>/"):
        assert cause in message, (cause, message)
    assert "train top-1" not in message  # it learned nothing at all: no overfitting hint


def test_chance_warning_fits_the_situation() -> None:
    assert _warning(top1=0.9) is None
    finetune = _warning(section="finetune", augment="none", dataset="digits")
    assert finetune is not None and "finetune.epochs = 2" in finetune and "finetune.lr" in finetune
    assert "augment" not in finetune and "data.root/train" not in finetune  # no augmentation, no folders
    overfit = _warning(train_top1=0.95)
    assert overfit is not None and "train top-1 is 95.0%" in overfit


def test_training_stage_prints_the_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """train_to_checkpoint (what baseline-train, sparse-train and finetune run) warns after fitting."""
    from slimcore_pipeline.config import Params
    from stages._training import train_to_checkpoint

    write_digit_folder(tmp_path / "images", n_train=4, n_val=2)
    from PIL import Image

    for png in (tmp_path / "images").rglob("*.png"):  # every image alike: any model scores exactly chance
        Image.new("RGB", (16, 16)).save(png)
    monkeypatch.chdir(tmp_path)
    params = Params.model_validate({
        "archs": [ARCH], "data": {"name": "imagefolder", "root": "images", "image_size": 8},
        "model": {"stem": "cifar", "width": 0.0625}, "runtime": {"device": "cpu"},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-6, "warmup_epochs": 0, "milestones": []}})
    train_to_checkpoint(params, ARCH, "baseline-train", tmp_path / "baseline.pt", train_cfg=params.train,
                        strength=0.0, module="stages.baseline_train")
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "warning: baseline-train@vgg16_bn: validation top-1" in err, err
    assert "train.epochs = 1" in err and "data.augment resolves to crop+flip" in err, err


# --------------------------------------------------------------------------------------------
# end to end: the page's keys, dvc repro, one image changed
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_own_data_under_dvc(tmp_path: Path) -> None:
    skip_without_dvc_checkout()
    from slimcore.checkpoint import load_model_and_meta

    proj = tmp_path / "proj"
    proj.mkdir()
    _copy_project(proj)
    settings = readme_settings()
    root = Path(str(settings["data.root"]))
    assert not root.is_absolute(), "the page's example root is inside the project (data/...)"
    write_digit_folder(proj / root)
    params = apply_settings(yaml.safe_load((proj / "params.yaml").read_text()), settings)
    params["archs"] = [ARCH]  # for time: one arch, ...
    params["train"]["batch_size"] = 16  # ... and several steps per epoch on 90 images
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_repo(proj, "own data: docs/own-data.md's keys")
    tracked = ok(["git", "ls-files", "data"], proj).output.split()
    assert tracked == ["data/.gitignore", "data/README.md"], f"images must stay out of git: {tracked}"

    repro = dvc("repro", STAGE, cwd=proj)
    assert repro.returncode == 0, repro.tail()
    assert f"Running stage '{STAGE}'" in repro.output, repro.tail()
    assert "warning:" not in repro.output, repro.tail()  # not near chance
    _, meta = load_model_and_meta(proj / "models" / ARCH / "baseline.pt", expected_arch=ARCH)
    chance = 1 / len(CLASSES)
    assert meta["val_top1"] > chance + CHANCE_MARGIN_PT / 100, (meta["val_top1"], repro.tail())
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"][STAGE]
    assert root.as_posix() in [d["path"] for d in lock["deps"]], lock["deps"]

    status = dvc("status", STAGE, cwd=proj)
    assert "up to date" in status.output, status.tail()
    image = next((proj / root / "train" / "digit7").glob("*.png"))
    from PIL import Image

    Image.open(image).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(image)  # one image changes
    status = dvc("status", STAGE, cwd=proj)
    assert status.returncode == 0, status.tail()
    assert STAGE in status.output and re.search(rf"modified:\s+{re.escape(root.as_posix())}", status.output), \
        status.tail()
    again = dvc("repro", STAGE, cwd=proj)
    assert again.returncode == 0, again.tail()
    assert f"Running stage '{STAGE}'" in again.output, again.tail()
    assert "up to date" in dvc("status", STAGE, cwd=proj).output
