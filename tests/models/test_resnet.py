"""ResNet-8/18 (FedPart): sizes, layer groups, equivalence with torchvision's ResNet, widths,
input shapes, generator-driven initialisation and no FedMA match layers."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import ResNet as TVResNet

from fedsim.models import MODELS, build_model
from tests.helpers import gen, group_modules, leaf_calls, n_params

pytestmark = pytest.mark.usefixtures("one_thread")
CIFAR = (3, 32, 32)

# ---------------------------------------------------------------- ResNet sizes and structure


def test_resnet8_has_exactly_1235274_parameters():
    # stem conv 3*64*7*7 = 9,408 (no bias) + BN 2*64 = 128                         ->     9,536
    # stage 1: conv 64*64*9 = 36,864 twice + 2 BN of 128                           ->    73,984
    # stage 2: conv 64*128*9 = 73,728 + conv 128*128*9 = 147,456
    #          + shortcut 1x1 64*128 = 8,192 + 3 BN of 256                         ->   230,144
    # stage 3: conv 128*256*9 = 294,912 + conv 256*256*9 = 589,824
    #          + shortcut 1x1 128*256 = 32,768 + 3 BN of 512                       ->   919,040
    # fc 256*10 + 10                                                               ->     2,570
    # total                                                                            1,235,274
    model = build_model("resnet8", num_classes=10, input_shape=CIFAR)
    assert n_params(model) == 1_235_274
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in model.modules())


def test_resnet18_has_torchvision_resnet18_size_keys_and_shapes():
    ours = build_model("resnet18", num_classes=10, input_shape=CIFAR)
    tv = torchvision.models.resnet18(num_classes=10)
    assert n_params(ours) == n_params(tv) == 11_181_642
    a, b = ours.state_dict(), tv.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def tv_resnet8() -> nn.Module:
    """ResNet-8 assembled from torchvision's own ResNet: layers [1,1,1], layer4 removed."""
    tv = TVResNet(TVBasicBlock, [1, 1, 1, 1], num_classes=10)
    tv.layer4 = nn.Identity()
    tv.fc = nn.Linear(256, 10)
    return tv


@pytest.mark.parametrize("name", ["resnet8", "resnet18"])
def test_resnet_computes_the_same_function_as_torchvision(name):
    ours = build_model(name, num_classes=10, input_shape=CIFAR, generator=gen(1)).eval()
    tv = (tv_resnet8() if name == "resnet8" else torchvision.models.resnet18(num_classes=10)).eval()
    tv.load_state_dict(ours.state_dict())  # strict: identical keys and shapes
    x = torch.randn((2, *CIFAR), generator=gen(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "count"), [("resnet8", 10), ("resnet18", 21)])
def test_resnet_layer_groups_count_and_cover_state_dict_once_in_forward_order(name, count):
    model = build_model(name, num_classes=10, input_shape=CIFAR)
    groups = model.layer_groups()
    assert len(groups) == count
    keys = [k for g in groups for k in g.tensors]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(model.state_dict())
    # groups, read left to right, name the conv then its BatchNorm in exactly the forward order
    assert group_modules(model) == leaf_calls(model, torch.zeros((1, *CIFAR)))
    for g in groups[:-1]:  # each conv group: one conv weight + the 5 entries of its BN
        assert len(g.tensors) == 6 and g.tensors[0].endswith(".weight")
        assert {k.rsplit(".", 1)[1] for k in g.tensors[1:]} == {
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        }
    assert groups[-1].name == "fc" and groups[-1].tensors == ("fc.weight", "fc.bias")


def test_resnet8_group_names_are_stem_then_conv1_conv2_downsample_then_fc():
    model = build_model("resnet8", num_classes=10, input_shape=CIFAR)
    assert [g.name for g in model.layer_groups()] == [
        "conv1",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.0.downsample",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.downsample",
        "fc",
    ]


def test_resnet_widths_change_channels_with_closed_form_size():
    w = {"layer1": 3, "layer2": 5, "layer3": 7}
    model = build_model("resnet8", num_classes=4, input_shape=CIFAR, widths=w)
    assert model.widths == w
    bn = lambda c: 2 * c  # noqa: E731
    expected = (
        3 * 3 * 49
        + bn(3)
        + 2 * (3 * 3 * 9 + bn(3))
        + 3 * 5 * 9
        + 5 * 5 * 9
        + 3 * 5
        + 3 * bn(5)
        + 5 * 7 * 9
        + 7 * 7 * 9
        + 5 * 7
        + 3 * bn(7)
        + 7 * 4
        + 4
    )
    assert n_params(model) == expected
    out = model(torch.randn((2, *CIFAR), generator=gen(0)))
    assert out.shape == (2, 4) and out.dtype == torch.float32


def test_resnet_fits_rgb_images_of_at_least_32_pixels_only():
    cls = MODELS["resnet8"]
    assert cls.fits((3, 32, 32)) and cls.fits((3, 64, 64))
    assert not cls.fits((1, 28, 28)) and not cls.fits((3, 16, 16)) and not cls.fits((80,))
    out = build_model("resnet18", num_classes=200, input_shape=(3, 64, 64))(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, 200)


def test_resnet_init_is_generator_driven_and_leaves_global_rng_alone():
    a = build_model("resnet8", num_classes=10, input_shape=CIFAR, generator=gen(3)).state_dict()
    torch.rand(100)  # moving the global RNG must not matter
    b = build_model("resnet8", num_classes=10, input_shape=CIFAR, generator=gen(3)).state_dict()
    c = build_model("resnet8", num_classes=10, input_shape=CIFAR, generator=gen(4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    state = torch.get_rng_state()
    build_model("resnet8", num_classes=10, input_shape=CIFAR, generator=gen(3))
    build_model("resnet8", num_classes=10, input_shape=CIFAR)
    assert torch.equal(torch.get_rng_state(), state)
    # He fan-out init: std of conv weights = sqrt(2 / (64 * 3 * 3)) for layer1 convs
    std = float(a["layer1.0.conv1.weight"].std())
    assert abs(std - (2 / (64 * 9)) ** 0.5) < 0.05 * (2 / (64 * 9)) ** 0.5
    assert torch.equal(a["bn1.weight"], torch.ones(64)) and torch.equal(a["bn1.bias"], torch.zeros(64))


def test_resnet_match_layers_are_empty():
    assert build_model("resnet8", num_classes=10, input_shape=CIFAR).match_layers() == []
