"""Model contracts: sizes, structure metadata (FedPart groups, FedMA match layers), widths,
generator-driven initialisation, forward MAC counting and input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.errors import FedsimError
from fedsim.models import MODELS, build_model, forward_macs
from tests.helpers import digits_cnn, gen, n_params

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (num_classes, input_shape) of the dataset the model is meant for
DEFAULT_SETUP = {
    "logreg": (10, (60,)),
    "lenet": (10, (1, 28, 28)),
    "lenet_fedma": (10, (1, 28, 28)),
    "vgg9": (10, (3, 32, 32)),
    "char_lstm": (80, (80,)),
    "digits_cnn": (10, (1, 8, 8)),
    "resnet8": (10, (3, 32, 32)),
    "resnet18": (10, (3, 32, 32)),
    "moon_cnn": (10, (3, 32, 32)),
}
# Models FedMA can match (the others return no match layers: BatchNorm/residual nets, MOON heads).
MATCHABLE = ("lenet", "lenet_fedma", "vgg9", "char_lstm", "digits_cnn")

# Non-default widths (small, odd, so that no dimension coincides by accident).
SMALL = {
    "logreg": ({}, 3, (60,)),
    "lenet": ({"conv1": 7, "conv2": 11, "fc1": 13}, 5, (1, 28, 28)),
    "lenet_fedma": ({"conv1": 7, "conv2": 11, "fc1": 13}, 5, (1, 28, 28)),
    "vgg9": (
        {"conv1": 3, "conv2": 5, "conv3": 4, "conv4": 6, "conv5": 7, "conv6": 9, "fc1": 10, "fc2": 11},
        7,
        (3, 32, 32),
    ),
    "char_lstm": ({"embedding": 5, "lstm": 12}, 30, (17,)),
    "digits_cnn": ({"conv1": 3, "conv2": 5, "fc1": 7}, 4, (1, 8, 8)),
    "resnet8": ({"layer1": 3, "layer2": 5, "layer3": 7}, 4, (3, 32, 32)),
    "resnet18": ({"layer1": 3, "layer2": 4, "layer3": 5, "layer4": 6}, 4, (3, 32, 32)),
    "moon_cnn": ({"conv1": 3, "conv2": 5, "fc1": 7, "fc2": 9, "projection": 11}, 4, (3, 32, 32)),
}


def build(name: str, seed: int = 0, small: bool = False) -> nn.Module:
    if small:
        widths, num_classes, shape = SMALL[name]
    else:
        widths, (num_classes, shape) = None, DEFAULT_SETUP[name]
    return build_model(name, num_classes=num_classes, input_shape=shape, widths=widths, generator=gen(seed))


def example(model: nn.Module, shape: tuple[int, ...], batch: int = 3) -> torch.Tensor:
    g = gen(123)
    if model.input_dtype == torch.int64:
        return torch.randint(0, model.num_classes, (batch, *shape), generator=g)
    return torch.randn((batch, *shape), generator=g)


def forward_order(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Parametrised leaf modules in the order the forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[str, nn.Module]] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: calls.append((names[mod], mod)))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return calls


# ---------------------------------------------------------------- parameter counts


def test_parameter_counts_match_the_papers():
    expected = {
        # conv1 1*20*25+20=520, conv2 20*50*25+50=25,050, fc1 800*500+500=400,500,
        # fc2 500*10+10=5,010
        "lenet": 431_080,
        "lenet_fedma": 431_080,  # the same parameters; only the forward differs
        # convs 3*32*9+32=896, 32*64*9+64=18,496, 64*128*9+128=73,856, 128*128*9+128=147,584,
        # 128*256*9+256=295,168, 256*256*9+256=590,080; fc1 4096*512+512=2,097,664,
        # fc2 512*512+512=262,656, fc3 512*10+10=5,130
        "vgg9": 3_491_530,
        # embedding 80*8=640; lstm 4*256*8 + 4*256*256 + 2*4*256 = 272,384; decoder 256*80+80=20,560
        "char_lstm": 293_584,
        # conv1 1*16*9+16=160, conv2 16*32*9+32=4,640, fc1 512*64+64=32,832, fc2 64*10+10=650
        "digits_cnn": 38_282,
        # arithmetic in tests/models/test_resnet.py
        "resnet8": 1_235_274,
        "resnet18": 11_181_642,
        "moon_cnn": 92_626,
        "logreg": 610,  # 60 * 10 + 10
    }
    assert set(expected) == set(MODELS)
    for name, count in expected.items():
        assert n_params(build(name)) == count, name


def closed_form_params(name: str, w: dict[str, int], c: int) -> int:
    if name in ("lenet", "lenet_fedma"):
        return (
            w["conv1"] * 25
            + w["conv1"]
            + w["conv1"] * w["conv2"] * 25
            + w["conv2"]
            + w["conv2"] * 16 * w["fc1"]
            + w["fc1"]
            + w["fc1"] * c
            + c
        )
    if name == "vgg9":
        total, c_in = 0, 3
        for k in ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6"):
            total += c_in * w[k] * 9 + w[k]
            c_in = w[k]
        return (
            total + w["conv6"] * 16 * w["fc1"] + w["fc1"] + w["fc1"] * w["fc2"] + w["fc2"] + w["fc2"] * c + c
        )
    if name == "char_lstm":
        e, h = w["embedding"], w["lstm"]
        return c * e + 4 * h * e + 4 * h * h + 8 * h + h * c + c
    if name == "digits_cnn":
        return (
            w["conv1"] * 9
            + w["conv1"]
            + w["conv1"] * w["conv2"] * 9
            + w["conv2"]
            + w["conv2"] * 16 * w["fc1"]
            + w["fc1"]
            + w["fc1"] * c
            + c
        )
    if name in ("resnet8", "resnet18"):
        stages = [w[k] for k in sorted(w)]  # layer1.. ; conv weights (no bias) + 2 per BN channel
        blocks = 1 if name == "resnet8" else 2
        total, c_in = 3 * stages[0] * 49 + 2 * stages[0], stages[0]
        for s, out in enumerate(stages):
            for b in range(blocks):
                total += c_in * out * 9 + 2 * out + out * out * 9 + 2 * out
                if c_in != out or (s > 0 and b == 0):
                    total += c_in * out + 2 * out
                c_in = out
        return total + c_in * c + c
    if name == "logreg":
        return 60 * c + c
    if name == "moon_cnn":
        return (
            3 * w["conv1"] * 25
            + w["conv1"]
            + w["conv1"] * w["conv2"] * 25
            + w["conv2"]
            + w["conv2"] * 25 * w["fc1"]
            + w["fc1"]
            + w["fc1"] * w["fc2"]
            + w["fc2"]
            + w["fc2"] * w["fc2"]
            + w["fc2"]
            + w["fc2"] * w["projection"]
            + w["projection"]
            + w["projection"] * c
            + c
        )
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_non_default_widths_build_with_closed_form_size_and_right_output(name):
    widths, num_classes, shape = SMALL[name]
    model = build(name, small=True)
    assert model.widths == widths
    assert n_params(model) == closed_form_params(name, widths, num_classes)
    out = model(example(model, shape, batch=3))
    assert out.shape == (3, num_classes) and out.dtype == torch.float32
    # the default-width formula agrees with the literal counts too
    default = build(name)
    assert n_params(default) == closed_form_params(name, default.widths, default.num_classes)


def test_partial_widths_override_only_the_named_layers():
    model = build_model("lenet", num_classes=10, input_shape=(1, 28, 28), widths={"fc1": 33})
    assert model.widths == {"conv1": 20, "conv2": 50, "fc1": 33}
    assert model.fc1.weight.shape == (33, 800) and model.fc2.weight.shape == (10, 33)


# ---------------------------------------------------------------- FedPart layer groups


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("small", [False, True])
def test_layer_groups_cover_state_dict_exactly_once_in_forward_order(name, small):
    model = build(name, small=small).eval()
    keys = [k for g in model.layer_groups() for k in g.tensors]
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(model.state_dict())
    shape = SMALL[name][2] if small else DEFAULT_SETUP[name][1]
    called = [n for n, _ in forward_order(model, example(model, shape))]
    owners = []  # modules owning each group's tensors, group after group (conv then its BN)
    for group in model.layer_groups():
        owners += [m for m in dict.fromkeys(k.rsplit(".", 1)[0] for k in group.tensors)]
    assert owners == called
    for group in model.layer_groups():  # a group is named after its first module (or its parent)
        first = group.tensors[0].rsplit(".", 1)[0]
        assert first == group.name or first.startswith(group.name + ".")


# ---------------------------------------------------------------- FedMA match layers

KIND_OF = {nn.Conv2d: "conv2d", nn.Linear: "linear", nn.Embedding: "embedding", nn.LSTM: "lstm"}


def units(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return module.hidden_size


def weight_key(name: str, module: nn.Module) -> str:
    return f"{name}.weight_ih_l0" if isinstance(module, nn.LSTM) else f"{name}.weight"


@pytest.mark.parametrize("name", MATCHABLE)
@pytest.mark.parametrize("small", [False, True])
def test_match_layers_follow_forward_order_with_consistent_keys_and_blocks(name, small):
    model = build(name, small=small).eval()
    shape = SMALL[name][2] if small else DEFAULT_SETUP[name][1]
    order = forward_order(model, example(model, shape))
    layers = model.match_layers()
    sd = model.state_dict()
    # every layer but the classifier is matched, in forward order, and widths names exactly them
    assert [m.name for m in layers] == [n for n, _ in order[:-1]]
    assert set(model.widths) == {m.name for m in layers}
    for i, m in enumerate(layers):
        module = order[i][1]
        next_name, next_module = order[i + 1]
        assert m.kind == KIND_OF[type(module)]
        assert model.widths[m.name] == units(module)
        assert m.weight == weight_key(m.name, module) and m.weight in sd
        assert m.next_weight == weight_key(next_name, next_module) and m.next_weight in sd
        assert m.next_block >= 1
        assert sd[m.next_weight].shape[1] == model.widths[m.name] * m.next_block
        if m.kind == "embedding":
            assert m.bias is None and m.recurrent == ()
            assert sd[m.weight].shape == (model.num_classes, model.widths[m.name])
        elif m.kind == "lstm":
            assert m.bias == f"{m.name}.bias_ih_l0"
            assert m.recurrent == (f"{m.name}.weight_hh_l0", f"{m.name}.bias_hh_l0")
            h = model.widths[m.name]
            assert sd[m.weight].shape == (4 * h, module.input_size)  # weight_ih is (4H, E)
            assert sd[m.recurrent[0]].shape == (4 * h, h)
        else:
            assert m.bias == f"{m.name}.bias" and m.recurrent == ()
            assert sd[m.weight].shape[0] == sd[m.bias].shape[0] == model.widths[m.name]
    w_key, b_key = model.classifier()
    assert (w_key, b_key) == (f"{order[-1][0]}.weight", f"{order[-1][0]}.bias")
    assert sd[w_key].shape[0] == sd[b_key].shape[0] == model.num_classes


def permute_units(model: nn.Module, perm_of: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict with each match layer's units permuted, using only the MatchLayer metadata."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for m in model.match_layers():
        p = perm_of[m.name]
        n = model.widths[m.name]
        if m.kind in ("linear", "conv2d"):
            sd[m.weight] = sd[m.weight][p]
            sd[m.bias] = sd[m.bias][p]
        elif m.kind == "embedding":
            sd[m.weight] = sd[m.weight][:, p]
        else:  # lstm: gate-blocked rows (4, H, ...) of the input weights; hh rows and columns
            sd[m.weight] = sd[m.weight].reshape(4, n, -1)[:, p].reshape(4 * n, -1)
            sd[m.bias] = sd[m.bias].reshape(4, n)[:, p].reshape(-1)
            w_hh, b_hh = m.recurrent
            sd[w_hh] = sd[w_hh].reshape(4, n, n)[:, p][:, :, p].reshape(4 * n, n)
            sd[b_hh] = sd[b_hh].reshape(4, n)[:, p].reshape(-1)
        nxt = sd[m.next_weight]  # input axis: n units, each a block of next_block columns
        blocks = nxt.reshape(nxt.shape[0], n, m.next_block, -1)
        sd[m.next_weight] = blocks[:, p].reshape(nxt.shape)
    return sd


def non_identity_perm(n: int, g: torch.Generator) -> torch.Tensor:
    while True:
        p = torch.randperm(n, generator=g)
        if not torch.equal(p, torch.arange(n)):
            return p


def test_models_fedma_cannot_match_have_no_match_layers():
    assert set(MATCHABLE) < set(MODELS)
    for name in set(MODELS) - set(MATCHABLE):
        assert build(name).match_layers() == []


@pytest.mark.parametrize("name", MATCHABLE)
def test_permuting_units_by_match_layer_metadata_preserves_the_function(name):
    model = build(name, small=True).eval()
    x = example(model, SMALL[name][2])
    before = model(x)
    g = gen(7)
    perms = {m.name: non_identity_perm(model.widths[m.name], g) for m in model.match_layers()}
    permuted = build(name, seed=99, small=True).eval()
    permuted.load_state_dict(permute_units(model, perms))
    assert not torch.equal(
        permuted.state_dict()[model.match_layers()[0].weight],
        model.state_dict()[model.match_layers()[0].weight],
    )
    torch.testing.assert_close(permuted(x), before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- initialisation


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_generator_seed_gives_identical_weights_regardless_of_global_rng(name):
    a = build(name, seed=3).state_dict()
    torch.rand(1000)  # move the global RNG: must not matter
    b = build(name, seed=3).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_different_generator_seeds_give_different_weights_in_every_random_tensor(name):
    a = build(name, seed=3).state_dict()
    b = build(name, seed=4).state_dict()
    for k in a:
        if torch.count_nonzero(a[k]) == 0 and torch.count_nonzero(b[k]) == 0:
            assert (
                (k == "decoder.bias" and name == "char_lstm")
                or ".bn" in f".{k}"
                or ("downsample.1" in k or k.endswith("running_mean") or "num_batches" in k)
            )
            continue  # zero by the authors' init, BN biases, BN buffers
        if torch.equal(a[k], b[k]) and a[k].unique().numel() == 1:  # BN weight 1, running_var 1
            assert "bn" in k or "downsample.1" in k, k
            continue
        assert not torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", sorted(MODELS))
def test_build_model_leaves_global_rng_state_unchanged(name):
    num_classes, shape = DEFAULT_SETUP[name]
    state = torch.get_rng_state()
    build_model(name, num_classes=num_classes, input_shape=shape, generator=gen(1))
    build_model(name, num_classes=num_classes, input_shape=shape)  # generator=None too
    assert torch.equal(torch.get_rng_state(), state)


def test_no_generator_is_deterministic():
    a = digits_cnn().state_dict()
    torch.rand(10)
    b = digits_cnn().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_follows_pytorch_default_ranges():
    model = build("lenet", seed=5)
    bound = 1 / (20 * 25) ** 0.5  # conv2 fan_in = 20 * 5 * 5
    w = model.conv2.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    lstm = build("char_lstm", seed=5)
    assert lstm.embedding.weight.abs().max() <= 0.1
    assert lstm.lstm.weight_hh_l0.abs().max() <= 1 / 256**0.5


# ---------------------------------------------------------------- forward MACs


def test_forward_macs_lenet_matches_hand_count():
    # conv1: out 20x24x24, each 1*5*5 MACs      = 20*576*25     =   288,000
    # conv2: in 20x12x12, out 50x8x8, 20*5*5    = 50*64*500     = 1,600,000
    # fc1: 800*500 = 400,000; fc2: 500*10 = 5,000 -> total 2,293,000
    model = build("lenet")
    assert forward_macs(model, (1, 28, 28)) == 2_293_000


def test_lenet_fedma_is_the_authors_lenet_with_no_relu_after_fc1():
    """IBM/FedMA model.py, LeNet: conv, pool, ReLU (twice), flatten, fc1, fc2 with nothing between
    fc1 and fc2; the same parameters as ``lenet``, whose only difference is that ReLU."""
    ours, usual = build("lenet_fedma", seed=3), build("lenet", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), usual.state_dict().values()))
    x = example(ours, (1, 28, 28), batch=4)
    h = torch.relu(nn.functional.max_pool2d(nn.functional.conv2d(x, ours.conv1.weight, ours.conv1.bias), 2))
    h = torch.relu(nn.functional.max_pool2d(nn.functional.conv2d(h, ours.conv2.weight, ours.conv2.bias), 2))
    z = h.reshape(4, -1) @ ours.fc1.weight.T + ours.fc1.bias
    with torch.no_grad():
        torch.testing.assert_close(ours(x), z @ ours.fc2.weight.T + ours.fc2.bias)
        torch.testing.assert_close(usual(x), z.relu() @ ours.fc2.weight.T + ours.fc2.bias)
    assert (z < 0).any()  # so the two models differ on x
    assert forward_macs(ours, (1, 28, 28)) == 2_293_000


def test_forward_macs_lstm_and_digits_match_hand_count():
    # char_lstm: 80 steps * 4*256*(8+256) = 21,626,880 + decoder 256*80 = 20,480; embedding 0
    assert forward_macs(build("char_lstm"), (80,)) == 21_647_360
    # digits_cnn: conv1 16*8*8*9 = 9,216; conv2 32*8*8*16*9 = 294,912; fc1 512*64 = 32,768;
    # fc2 64*10 = 640 -> 337,536
    assert forward_macs(build("digits_cnn"), (1, 8, 8)) == 337_536


def test_forward_macs_leaves_mode_and_global_rng_alone():
    model = build("vgg9", small=True).train()
    state = torch.get_rng_state()
    forward_macs(model, (3, 32, 32))
    assert model.training
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- bad input


def test_unknown_model_name_lists_the_known_names():
    with pytest.raises(FedsimError) as err:
        build_model("resnet99", num_classes=10, input_shape=(3, 32, 32))
    msg = str(err.value)
    assert "resnet99" in msg and all(n in msg for n in MODELS) and "\n" not in msg


@pytest.mark.parametrize(
    ("name", "shape", "fits"),
    [
        ("lenet", (80,), "char_lstm"),
        ("char_lstm", (1, 28, 28), "lenet"),
        ("vgg9", (1, 8, 8), "digits_cnn"),
        ("digits_cnn", (3, 32, 32), "vgg9"),
    ],
)
def test_incompatible_input_shape_names_model_shape_and_fitting_model(name, shape, fits):
    with pytest.raises(FedsimError) as err:
        build_model(name, num_classes=10, input_shape=shape)
    msg = str(err.value)
    assert repr(name) in msg and str(shape) in msg and repr(fits) in msg and "\n" not in msg


def test_shape_no_model_fits_says_so():
    with pytest.raises(FedsimError, match="no built-in model"):
        build_model("lenet", num_classes=10, input_shape=(3, 16, 16))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"widths": {"conv3": 5}}, "no hidden layer 'conv3'"),
        ({"widths": {"fc1": 0}}, "positive integer"),
        ({"widths": {"fc1": 2.5}}, "positive integer"),
        ({"num_classes": 1}, "num_classes >= 2"),
        ({"input_shape": (1, 0, 28)}, "input_shape"),
        ({"input_shape": "1x28x28"}, "input_shape"),
        ({"generator": 42}, "torch.Generator"),
    ],
)
def test_bad_arguments_raise_fedsim_error(kwargs, pattern):
    args = {"num_classes": 10, "input_shape": (1, 28, 28), **kwargs}
    with pytest.raises(FedsimError, match=pattern):
        build_model("lenet", **args)


# ---------------------------------------------------------------- it learns


def test_digits_cnn_learns_sklearn_digits_above_90_percent():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = gen(0)
    order = torch.randperm(len(y), generator=g)
    train, test = order[:1400], order[1400:]
    model = build("digits_cnn", seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        shuffled = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(shuffled), 32):
            b = shuffled[i : i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9
