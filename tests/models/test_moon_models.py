"""MOON's projection-head models: the moon_cnn size, shapes of the projection z, the
``<base>+moon`` wrapper, its layer groups and widths, and bad MOON model names."""

from __future__ import annotations

import pickle

import pytest
import torch

from fedsim.errors import FedsimError
from fedsim.models import build_model, model_class, with_projection_head
from fedsim.models.moon import ProjectionHeadModel
from tests.helpers import gen, group_modules, leaf_calls, n_params

pytestmark = pytest.mark.usefixtures("one_thread")
CIFAR = (3, 32, 32)

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
