"""Accounting: thop-convention MAC counts checked by hand, FedPart's round schedule, and the
projection that reproduces FedPart's cost table (NeurIPS 2024: ResNet-8, CIFAR-10 shapes, 40 clients
x 500 examples, 8 local epochs, 1 cycle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.accounting import (
    FedPartSchedule,
    RoundSpec,
    fedpart_gb,
    fedpart_schedule,
    forward_cost,
    project_run,
    thop_layer_macs,
    thop_macs,
    training_macs,
)
from fedsim.errors import FedsimError
from fedsim.models import build_model, forward_macs

CIFAR = (3, 32, 32)
pytestmark = pytest.mark.usefixtures("one_thread")
PAPER = dict(num_clients=40, clients_per_round=40, examples_per_client=500, local_epochs=8)


@pytest.fixture(scope="module")
def resnet8():
    return build_model("resnet8", num_classes=10, input_shape=CIFAR)


class Tiny(nn.Module):
    """conv 2->3 3x3 (bias) -> affine BN -> ReLU -> non-affine BN -> global avg pool -> fc 3->4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()
        self.bn_plain = nn.BatchNorm2d(3, affine=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        x = self.bn_plain(self.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(x).flatten(1))


# ---------------------------------------------------------------- MAC counting


def test_thop_counts_of_a_tiny_net_match_hand_count():
    # input 2x5x5 -> conv output 3x3x3 = 27 elements, each 2*3*3 = 18 MACs; bias not counted
    # affine BN: 2*27 doubled = 108; non-affine BN: 2*27 = 54; ReLU: 0
    # adaptive avg pool 3x3 -> 1x1: (9 + 1) * 3 outputs = 30; fc: 3 * 4 = 12
    per_layer = thop_layer_macs(Tiny(), (2, 5, 5))
    assert per_layer == {"conv": 486, "bn": 108, "bn_plain": 54, "pool": 30, "fc": 12}
    assert thop_macs(Tiny(), (2, 5, 5)) == 690
    # fedsim's own convention counts the conv and the linear layer only
    assert forward_cost(Tiny(), (2, 5, 5), "fedsim") == 486 + 12


def test_thop_count_of_resnet8_matches_hand_count(resnet8):
    # convs (C_out * H_out * W_out * C_in * k * k), 3x32x32 input:
    #   stem 64*16*16*3*49 = 2,408,448 (then max-pool to 8x8)
    #   stage 1 (8x8): 2 convs 64*8*8*64*9 = 2,359,296 each                  = 4,718,592
    #   stage 2 (4x4): 128*16*64*9 = 1,179,648 + 128*16*128*9 = 2,359,296
    #                  + shortcut 128*16*64 = 131,072                        = 3,670,016
    #   stage 3 (2x2): 256*4*128*9 = 1,179,648 + 256*4*256*9 = 2,359,296
    #                  + shortcut 256*4*128 = 131,072                        = 3,670,016
    #   fc 256*10 = 2,560                              conv + fc total    = 14,469,632
    # BN outputs: 64*256 + 2*64*64 + 3*128*16 + 3*256*4 = 33,792, thop counts 4 each = 135,168
    # adaptive avg pool 2x2 -> 1: (4 + 1) * 256 = 1,280
    assert thop_macs(resnet8, CIFAR) == 14_469_632 + 135_168 + 1_280
    # the default convention is unchanged: convolutions and linear layers only
    assert forward_macs(resnet8, CIFAR) == 14_469_632
    assert forward_cost(resnet8, CIFAR, "fedsim") == 14_469_632


def test_thop_lstm_count_matches_hand_count():
    model = build_model("char_lstm", num_classes=30, input_shape=(17,), widths={"embedding": 5, "lstm": 12})
    # per step: 4 gates * ((5 + 12) * 12 + 12 + 2 * 12) + 3 * 12 + 12 = 4 * 240 + 48 = 1,008
    # 17 steps = 17,136; decoder 12 * 30 = 360; embedding 0
    assert thop_macs(model, (17,)) == 17_136 + 360


def test_thop_counting_leaves_mode_and_global_rng_alone(resnet8):
    resnet8.train()
    state = torch.get_rng_state()
    thop_macs(resnet8, CIFAR)
    assert resnet8.training and torch.equal(torch.get_rng_state(), state)


def test_uncountable_layers_and_unknown_convention_raise():
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        thop_macs(nn.Sequential(nn.ConvTranspose2d(1, 1, 2)), (1, 4, 4))
    with pytest.raises(TypeError, match="Bilinear"):
        thop_macs(nn.Sequential(nn.Flatten(), nn.Bilinear(2, 2, 2)), (2,))
    with pytest.raises(FedsimError, match="'flops'"):
        forward_cost(Tiny(), (2, 5, 5), "flops")


def test_training_macs_is_3f_full_and_2f_partial():
    assert training_macs(7, examples=500, local_epochs=8, phase="full") == 500 * 8 * 3 * 7
    assert training_macs(7, examples=500, local_epochs=8, phase="partial") == 500 * 8 * 2 * 7
    with pytest.raises(FedsimError, match="phase"):
        training_macs(7, 1, 1, "half")


# ---------------------------------------------------------------- schedules


def test_fedpart_cycle_is_warmup_then_two_rounds_per_group_shallow_to_deep():
    specs = fedpart_schedule(10, FedPartSchedule(warmup_rounds=5, rounds_per_group=2, cycles=1))
    assert len(specs) == 25
    assert [s.round for s in specs] == list(range(25))
    assert [s.phase for s in specs[:5]] == ["full"] * 5 and all(s.group is None for s in specs[:5])
    assert [s.group for s in specs[5:]] == [g for g in range(10) for _ in range(2)]
    assert all(s.phase == "partial" and s.cycle == 0 for s in specs[5:])


def test_fedpart_cycles_repeat_and_orders():
    two = fedpart_schedule(3, FedPartSchedule(warmup_rounds=1, rounds_per_group=1, cycles=2))
    assert [(s.cycle, s.phase, s.group) for s in two] == [
        (0, "full", None),
        (0, "partial", 0),
        (0, "partial", 1),
        (0, "partial", 2),
        (1, "full", None),
        (1, "partial", 0),
        (1, "partial", 1),
        (1, "partial", 2),
    ]
    rev = fedpart_schedule(3, FedPartSchedule(warmup_rounds=0, rounds_per_group=2, order="reverse"))
    assert [s.group for s in rev] == [2, 2, 1, 1, 0, 0]
    explicit = fedpart_schedule(3, FedPartSchedule(warmup_rounds=0, rounds_per_group=1, order=(1, 0, 2)))
    assert [s.group for s in explicit] == [1, 0, 2]
    sched = FedPartSchedule(warmup_rounds=1, rounds_per_group=2, cycles=3, order="random")
    a = fedpart_schedule(6, sched, np.random.default_rng(1))
    b = fedpart_schedule(6, sched, np.random.default_rng(1))
    assert a == b  # a function of the generator only
    for cycle in range(3):  # every group trained exactly R rounds per cycle, consecutively
        groups = [s.group for s in a if s.cycle == cycle and s.phase == "partial"]
        assert sorted(groups) == sorted(list(range(6)) * 2)
        assert all(groups[2 * i] == groups[2 * i + 1] for i in range(6))
    orders = {tuple(s.group for s in a if s.cycle == c and s.phase == "partial") for c in range(3)}
    assert len(orders) > 1  # a fresh permutation each cycle


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"order": "zigzag"}, "unknown FedPart order"),
        ({"order": (0, 0, 1)}, "not a permutation"),
        ({"order": "random"}, "needs a generator"),
        ({"rounds_per_group": 0}, "rounds_per_group"),
        ({"warmup_rounds": -1}, "warmup_rounds"),
        ({"cycles": 0}, "cycles"),
    ],
)
def test_bad_schedules_raise_fedsim_error(kwargs, pattern):
    with pytest.raises(FedsimError, match=pattern):
        fedpart_schedule(3, FedPartSchedule(**kwargs))


# ---------------------------------------------------------------- FedPart's table


def test_project_run_reproduces_fedpart_cost_table(resnet8):
    full = project_run(resnet8, CIFAR, rounds=25, **PAPER)
    part = project_run(resnet8, CIFAR, schedule=FedPartSchedule(cycles=1), **PAPER)
    assert len(full.rounds) == len(part.rounds) == 25
    paper = {  # (ours, the paper's number)
        "upload full (GB)": (fedpart_gb(full.bytes_up), 4.83),
        "upload FedPart (GB)": (fedpart_gb(part.bytes_up), 1.35),
        "compute full per client (1e12 MACs)": (full.per_client_macs / 1e12, 4.38),
        "compute FedPart per client (1e12 MACs)": (part.per_client_macs / 1e12, 3.21),
    }
    for label, (ours, theirs) in paper.items():
        assert abs(ours - theirs) <= 0.02 * theirs, label
        assert round(ours, 2) == theirs, label  # equal as the paper rounds them
    assert round(part.bytes_up / full.bytes_up, 2) == 0.28
    assert round(part.per_client_macs / full.per_client_macs, 3) == 0.733
    # the exact arithmetic behind them
    assert full.bytes_up == 25 * 40 * 1_235_274 * 4
    assert part.bytes_up == (5 + 2) * 40 * 1_235_274 * 4
    assert full.per_client_macs == 25 * 8 * 500 * 3 * 14_606_080
    assert part.per_client_macs == (5 * 3 + 20 * 2) * 8 * 500 * 14_606_080


def test_partial_rounds_move_only_the_active_group(resnet8):
    proj = project_run(resnet8, CIFAR, schedule=FedPartSchedule(), **PAPER)
    stem = proj.rounds[5]  # first partial round: the stem conv + its BN
    assert (stem.phase, stem.group, stem.group_name) == ("partial", 0, "conv1")
    assert stem.bytes_up == 40 * (3 * 64 * 49 + 2 * 64) * 4  # BN running stats stay local
    assert stem.bytes_down == 40 * 1_235_274 * 4  # the whole model goes down by default
    assert stem.macs == 40 * 500 * 8 * 2 * proj.forward_macs
    fc = proj.rounds[-1]
    assert fc.group_name == "fc" and fc.bytes_up == 40 * (256 * 10 + 10) * 4
    shared = project_run(
        resnet8, CIFAR, schedule=FedPartSchedule(), share_bn_stats=True, partial_download="group", **PAPER
    )
    # + running_mean and running_var (64 float32 each) + num_batches_tracked (one int64)
    per_client = (3 * 64 * 49 + 2 * 64) * 4 + 2 * 64 * 4 + 8
    assert shared.rounds[5].bytes_up == shared.rounds[5].bytes_down == 40 * per_client
    assert shared.rounds[0].bytes_up == 40 * (1_235_274 + 2 * 1_344) * 4 + 40 * 9 * 8


def test_per_client_totals_average_over_the_federation_when_cohorts_are_smaller(resnet8):
    proj = project_run(
        resnet8,
        CIFAR,
        rounds=3,
        num_clients=40,
        clients_per_round=10,
        examples_per_client=100,
        local_epochs=1,
        convention="fedsim",
    )
    assert proj.forward_macs == 14_469_632
    assert proj.macs == 3 * 10 * 100 * 3 * 14_469_632
    assert proj.per_client_macs == proj.macs / 40
    assert proj.per_client_bytes_up == 3 * 10 * 1_235_274 * 4 / 40
    frame = proj.to_frame()
    assert list(frame["round"]) == [0, 1, 2] and (frame["bytes_up"] == 10 * 1_235_274 * 4).all()


def test_explicit_round_specs_are_accepted_and_checked(resnet8):
    specs = [RoundSpec(0, 0, "partial", 9), RoundSpec(1, 0, "full")]
    proj = project_run(resnet8, CIFAR, schedule=specs, **PAPER)
    assert proj.rounds[0].group_name == "fc"
    with pytest.raises(FedsimError, match="group 10"):
        project_run(resnet8, CIFAR, schedule=[RoundSpec(0, 0, "partial", 10)], **PAPER)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rounds": 3, "schedule": FedPartSchedule()}, "either schedule"),
        ({}, "either schedule"),
        ({"rounds": 3, "clients_per_round": 41}, "exceeds num_clients"),
        ({"rounds": 0}, "rounds"),
        ({"rounds": 3, "local_epochs": 0}, "local_epochs"),
        ({"rounds": 3, "partial_download": "half"}, "partial_download"),
        ({"rounds": 3, "convention": "flops"}, "convention"),
    ],
)
def test_bad_projection_arguments_raise_fedsim_error(resnet8, kwargs, pattern):
    args = {**PAPER, **kwargs}
    with pytest.raises(FedsimError, match=pattern):
        project_run(resnet8, CIFAR, **args)
