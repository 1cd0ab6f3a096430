"""ResNet-8/18 (FedPart) and MOON's projection-head models: sizes, layer groups, equivalence with
torchvision's ResNet, shapes of the projection z, the ``<base>+moon`` wrapper and its groups."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import ResNet as TVResNet

from fedsim.errors import FedsimError
from fedsim.models import MODELS, build_model, model_class, with_projection_head
from fedsim.models.moon import ProjectionHeadModel

CIFAR = (3, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def leaf_calls(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the parametrised modules in the order the forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: calls.append(names[mod]))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return calls


def group_modules(model) -> list[str]:
    """Module names owning each group's tensors, group by group, in order of first appearance."""
    out: list[str] = []
    for g in model.layer_groups():
        for k in g.tensors:
            mod = k.rsplit(".", 1)[0]
            if mod not in out:
                out.append(mod)
    return out


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


# ---------------------------------------------------------------- MOON models


def test_moon_cnn_size_shapes_and_projection():
    # encoder conv1 3*6*25+6 = 456, conv2 6*16*25+16 = 2,416, fc1 400*120+120 = 48,120,
    # fc2 120*84+84 = 10,164; proj1 84*84+84 = 7,140; proj2 84*256+256 = 21,760;
    # fc 256*10+10 = 2,570 -> 92,626
    model = build_model("moon_cnn", num_classes=10, input_shape=CIFAR, generator=gen(0))
    assert n_params(model) == 92_626
    assert model.proj1.weight.shape == (84, 84) and model.proj2.weight.shape == (256, 84)
    assert model.fc.weight.shape == (10, 256)
    x = torch.randn((5, *CIFAR), generator=gen(1))
    logits, z = model(x, return_projection=True)
    assert logits.shape == (5, 10) and z.shape == (5, 256)
    assert logits.dtype == z.dtype == torch.float32
    torch.testing.assert_close(model(x), logits)
    torch.testing.assert_close(model.features(x), z)
    torch.testing.assert_close(model.fc(z), logits)  # the classifier reads the projection z
    assert (z < 0).any()  # no ReLU after the projection's last layer


def test_moon_cnn_groups_are_encoder_then_head_then_classifier():
    model = build_model("moon_cnn", num_classes=10, input_shape=CIFAR)
    assert [g.name for g in model.layer_groups()] == [
        "encoder.conv1",
        "encoder.conv2",
        "encoder.fc1",
        "encoder.fc2",
        "proj1",
        "proj2",
        "fc",
    ]
    keys = [k for g in model.layer_groups() for k in g.tensors]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(model.state_dict())
    assert group_modules(model) == leaf_calls(model, torch.zeros((1, *CIFAR)))
    assert model.classifier() == ("fc.weight", "fc.bias")


@pytest.mark.parametrize(
    ("base", "shape", "classes", "d", "n_groups"),
    [
        ("digits_cnn", (1, 8, 8), 10, 64, 6),
        ("lenet", (1, 28, 28), 10, 500, 6),
        ("resnet8", CIFAR, 10, 256, 12),
        ("char_lstm", (20,), 80, 256, 5),
    ],
)
def test_plus_moon_wrapper_uses_penultimate_features_and_lists_groups(base, shape, classes, d, n_groups):
    name = f"{base}+moon"
    model = build_model(name, num_classes=classes, input_shape=shape, generator=gen(5)).eval()
    plain = build_model(base, num_classes=classes, input_shape=shape, generator=gen(5)).eval()
    if model.input_dtype == torch.int64:
        x = torch.randint(0, classes, (3, *shape), generator=gen(6))
    else:
        x = torch.randn((3, *shape), generator=gen(6))
    # the encoder is the base model without its classifier: same weights (same generator draws)
    # and h = the input the base model's classifier receives
    head = plain.classifier()[0].rsplit(".", 1)[0]
    seen = []
    hook = plain.get_submodule(head).register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        plain(x)
        h = model.encoder(x)
    hook.remove()
    assert h.shape == (3, d)
    torch.testing.assert_close(h, seen[0])
    enc_sd = model.encoder.state_dict()
    for k, v in plain.state_dict().items():
        if k.rsplit(".", 1)[0] != head:
            assert torch.equal(enc_sd[k], v), k
    # head shapes and outputs
    assert model.proj1.weight.shape == (d, d) and model.proj2.weight.shape == (256, d)
    with torch.no_grad():
        logits, z = model(x, return_projection=True)
    assert logits.shape == (3, classes) and z.shape == (3, 256)
    # groups: the base's groups (classifier dropped, prefixed), then proj1, proj2, fc
    base_groups = [g.name for g in plain.layer_groups()][:-1]
    names = [g.name for g in model.layer_groups()]
    assert names == [f"encoder.{n}" for n in base_groups] + ["proj1", "proj2", "fc"]
    assert len(names) == n_groups
    keys = [k for g in model.layer_groups() for k in g.tensors]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(model.state_dict())
    assert model.match_layers() == []


def test_plus_moon_widths_reach_encoder_and_projection():
    model = build_model(
        "digits_cnn+moon", num_classes=10, input_shape=(1, 8, 8), widths={"fc1": 7, "projection": 9}
    )
    assert model.widths == {"conv1": 16, "conv2": 32, "fc1": 7, "projection": 9}
    assert model.proj1.weight.shape == (7, 7) and model.proj2.weight.shape == (9, 7)
    assert model.features(torch.zeros(2, 1, 8, 8)).shape == (2, 9)
    with pytest.raises(FedsimError, match="no hidden layer 'proj'"):
        build_model("digits_cnn+moon", num_classes=10, input_shape=(1, 8, 8), widths={"proj": 3})


def test_plus_moon_class_is_unique_picklable_and_checks_shapes():
    cls = model_class("resnet8+moon")
    assert cls is with_projection_head("resnet8") and issubclass(cls, ProjectionHeadModel)
    assert cls.fits(CIFAR) and not cls.fits((1, 8, 8))
    model = build_model("digits_cnn+moon", num_classes=10, input_shape=(1, 8, 8)).eval()
    copy = pickle.loads(pickle.dumps(model)).eval()
    x = torch.randn((2, 1, 8, 8), generator=gen(0))
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))
    with pytest.raises(FedsimError, match="cannot take the dataset's input shape"):
        build_model("resnet8+moon", num_classes=10, input_shape=(1, 8, 8))


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("moon_cnn+moon", "already has MOON's projection head"),
        ("resnet99+moon", "unknown model 'resnet99\\+moon'"),
        ("resnet8+fedprox", "unknown model"),
    ],
)
def test_bad_moon_model_names_raise_one_line_fedsim_error(name, pattern):
    with pytest.raises(FedsimError, match=pattern) as err:
        build_model(name, num_classes=10, input_shape=CIFAR)
    assert "\n" not in str(err.value)
