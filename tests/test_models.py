"""build_model: torchvision's reference models as is, small-input stems, width scaling, the spec."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torchvision
from torch import nn

from slimcore.archs import REFERENCE_ARCHS, min_image_size
from slimcore.models import ModelSpec, build_model, has_batchnorm, scale_channels, spec_of


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny forward passes: one intra-op thread is as fast, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# The module whose output is the last feature map (before global pooling), per reference arch.
FEATURES = {"vgg16_bn": "features", "resnet50": "layer4", "mobilenet_v2": "features"}


@pytest.mark.parametrize(("arch", "expected"), [
    ("vgg16_bn", 134_678_692),
    ("resnet50", 23_712_932),
    ("mobilenet_v2", 2_351_972),
])
def test_full_size_models_have_torchvisions_parameter_counts(arch: str, expected: int) -> None:
    model = build_model(arch, 100, "imagenet", 1.0)
    assert _n_params(model) == expected
    assert model.training


@pytest.mark.parametrize("arch,seed_gflops", [("vgg16_bn", 15.51), ("resnet50", 4.11), ("mobilenet_v2", 0.313)])
def test_full_size_flops_are_within_5_percent_of_the_seed(arch: str, seed_gflops: float) -> None:
    """The seed table's FLOPs convention: thop's count at 224px / 100 classes vs the seed table."""
    from slimcore.flops import count_flops

    gflops = count_flops(build_model(arch, 100), 224) / 1e9
    assert abs(gflops - seed_gflops) / seed_gflops <= 0.05, gflops


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2"])
def test_full_size_models_are_torchvisions_layer_for_layer(arch: str) -> None:
    ours = build_model(arch, 100, "imagenet", 1.0)
    theirs = torchvision.models.get_model(arch, weights=None, num_classes=100)
    assert _shapes(ours) == _shapes(theirs)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("arch", REFERENCE_ARCHS)
def test_small_models_run_and_downsample_as_archs_py_says(arch: str, stem: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 7, stem, 0.125).eval()
    need = min_image_size(arch, stem)
    seen: list[torch.Size] = []
    model.get_submodule(FEATURES[arch]).register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        for size, spatial in ((need, 1), (2 * need, 2)):
            out = model(torch.randn(2, 3, size, size))
            assert out.shape == (2, 7)
            assert torch.isfinite(out).all()
            assert tuple(seen[-1][2:]) == (spatial, spatial), (size, seen[-1])


def test_cifar_stem_keeps_resolution_in_the_stem() -> None:
    resnet = build_model("resnet50", 10, "cifar", 1.0)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    # torchvision's ResNet-50 with only the 7x7/2 stem convolution swapped for a 3x3/1 one
    assert _n_params(resnet) == _n_params(build_model("resnet50", 10, "imagenet", 1.0)) - 64 * 3 * (49 - 9)
    mobilenet = build_model("mobilenet_v2", 10, "cifar", 0.5)
    assert mobilenet.features[0][0].stride == (1, 1)
    vgg = build_model("vgg16_bn", 10, "cifar", 0.25)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.features) == 3
    assert [type(m) for m in vgg.classifier] == [nn.Linear]
    assert vgg.classifier[0].in_features == 128 and vgg.classifier[0].out_features == 10


def test_scale_channels() -> None:
    assert scale_channels(64, 1.0) == 64
    assert scale_channels(67, 1.0) == 67  # width 1 is torchvision's widths, unrounded
    assert scale_channels(64, 0.125) == 8
    assert scale_channels(512, 0.25) == 128
    assert scale_channels(96, 0.3) == 32
    assert scale_channels(64, 0.01) == 8  # never below the divisor
    assert scale_channels(64, 2.0) == 128
    for channels in (16, 24, 100, 320, 4096):
        for width in (0.1, 0.33, 0.5, 0.75):
            scaled = scale_channels(channels, width)
            assert scaled % 8 == 0
            assert scaled >= 8
            if channels * width >= 8:  # otherwise the floor of 8 applies
                assert abs(scaled - channels * width) <= 4


def test_width_scales_every_stage() -> None:
    vgg = build_model("vgg16_bn", 10, "cifar", 0.25)
    bns = [m.num_features for m in vgg.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == [16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    resnet = build_model("resnet50", 10, "imagenet", 0.25)
    assert resnet.conv1.out_channels == 16
    assert [resnet.get_submodule(f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [16, 32, 64, 128]
    assert resnet.fc.in_features == 128 * 4
    sizes = [_n_params(build_model(arch, 10, "cifar", w)) for arch in REFERENCE_ARCHS for w in (0.125, 0.25, 0.5)]
    for i in range(0, len(sizes), 3):
        assert sizes[i] < sizes[i + 1] < sizes[i + 2]


@pytest.mark.parametrize("arch", REFERENCE_ARCHS)
def test_small_models_are_real_tensors_initialised_like_torchvision(arch: str) -> None:
    torch.manual_seed(1)
    model = build_model(arch, 10, "cifar", 0.125)
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert has_batchnorm(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # slimming starts from gamma = 1
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    torch.manual_seed(1)
    again = build_model(arch, 10, "cifar", 0.125)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "googlenet"])
def test_other_torchvision_classifiers_build_by_name(arch: str) -> None:
    model = build_model(arch, 5)
    assert spec_of(model) == ModelSpec("torchvision", arch, 5, "imagenet", 1.0)
    assert has_batchnorm(model)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor)  # no auxiliary-logits tuple, even in training mode
    assert out.shape == (2, 5)


def test_unknown_arch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown arch 'resnet51'") as info:
        build_model("resnet51", 10)
    assert "vgg16_bn" in str(info.value) and "list_models" in str(info.value)


def test_variants_of_other_archs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'resnet18' is supported at stem='imagenet', width=1 only"):
        build_model("resnet18", 10, "cifar", 1.0)
    with pytest.raises(ValueError, match=r"'resnet18' is supported at stem='imagenet', width=1 only"):
        build_model("resnet18", 10, "imagenet", 0.5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 0}, "num_classes must be >= 1, got 0"),
    ({"stem": "tiny"}, "stem must be one of ['imagenet', 'cifar'], got 'tiny'"),
    ({"width": 0.0}, "width must be in (0, 4], got 0.0"),
    ({"width": 5.0}, "width must be in (0, 4], got 5.0"),
])
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    args = {"arch": "mobilenet_v2", "num_classes": 10, "stem": "cifar", "width": 0.125, **kwargs}
    with pytest.raises(ValueError) as info:
        build_model(**args)
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------
# ModelSpec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", REFERENCE_ARCHS)
def test_spec_round_trips_to_the_same_model(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 6, "cifar", 0.125).eval()
    spec = spec_of(model)
    assert spec == ModelSpec("torchvision", arch, 6, "cifar", 0.125) == ModelSpec.parse(arch, 6, "cifar", 0.125)
    data = json.loads(json.dumps(spec.to_dict()))  # what a checkpoint stores
    assert data == {"source": "torchvision", "name": arch, "num_classes": 6, "stem": "cifar", "width": 0.125,
                    "kwargs": {}}
    assert spec.arch == arch
    rebuilt_spec = ModelSpec.from_dict(data)
    # a version-1 checkpoint's spec (no source: torchvision) reads as the same spec
    assert ModelSpec.from_dict({"arch": arch, "num_classes": 6, "stem": "cifar", "width": 0.125}) == spec
    assert rebuilt_spec == spec
    rebuilt = rebuilt_spec.build().eval()
    assert spec_of(rebuilt) == spec
    assert _shapes(rebuilt) == _shapes(model)
    rebuilt.load_state_dict(model.state_dict())
    x = spec.example_inputs(batch=2)
    assert x.shape == (2, 3, spec.min_image_size, spec.min_image_size)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_spec_defaults_follow_build_model() -> None:
    spec = ModelSpec("torchvision", "mobilenet_v2", 10)
    assert (spec.stem, spec.width) == ("imagenet", 1.0)
    assert spec.min_image_size == min_image_size("mobilenet_v2", "imagenet") == 32
    assert spec_of(build_model("mobilenet_v2", 10)) == spec
    assert spec.example_inputs(image_size=40).shape == (1, 3, 40, 40)
    assert ModelSpec("torchvision", "vgg16_bn", 10, "cifar", 0.125).min_image_size == 8


def test_spec_is_immutable_and_survives_deepcopy() -> None:
    model = build_model("vgg16_bn", 3, "cifar", 0.125)
    spec = spec_of(model)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.width = 1.0  # type: ignore[misc]
    assert spec_of(copy.deepcopy(model)) == spec


def test_models_not_built_here_have_no_spec() -> None:
    with pytest.raises(ValueError, match=r"build it with slimcore\.models\.build_model"):
        spec_of(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no slimcore ModelSpec"):
        spec_of(torchvision.models.resnet18(num_classes=3))


def test_archs_without_batchnorm_are_known_without_building_them() -> None:
    """archs.has_batchnorm (torch-free, used by params validation) agrees with the models."""
    import torchvision
    from torch import nn

    from slimcore.archs import classification_archs, has_batchnorm

    sample = [a for a in classification_archs() if not has_batchnorm(a)]
    sample += ["vgg16_bn", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet",
               "shufflenet_v2_x0_5", "mnasnet0_5", "maxvit_t", "inception_v3"]
    assert {"vgg16", "alexnet", "vit_b_16", "swin_t", "convnext_tiny", "squeezenet1_0"} <= set(sample)
    for arch in sample:
        with torch.device("meta"):
            model = torchvision.models.get_model(arch)
        found = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert found == has_batchnorm(arch), arch
