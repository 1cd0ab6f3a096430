"""Communication and computation accounting, and its projection for a whole run (docs/algorithms.md
section 6; FedPart: Wang et al., "Why Go Full? Elevating Federated Learning Through Partial Network
Updates", NeurIPS 2024, section 5 and its cost table).

* :func:`thop_macs` counts the forward multiply-accumulates F of one example the way the ``thop``
  profiler counts them (FedPart's numbers were made with it); ``fedsim.models.forward_macs`` keeps
  fedsim's simpler convention (conv, linear and LSTM only). :func:`forward_cost` picks one.
* :func:`fedpart_schedule` lays out FedPart's rounds: per cycle W full-network rounds, then R rounds
  for each layer group, shallow to deep (or reversed, or shuffled).
* :func:`project_run` is a pure function that projects, before running anything, the bytes each
  round moves and the multiply-accumulates it costs, for FedPart or for full-network training.

Conventions (FedPart's): a training example costs 3F in a full-network round and 2F in a partial
round; bytes are numel x element size (4 for float32) of exactly the tensors that cross the wire.
The paper counts upload only and reports "GB" = bytes / 1e6 / 1024 (:func:`fedpart_gb`).

Reproducing FedPart's table (ResNet-8, 3x32x32, 40 clients x 500 examples, 8 local epochs, 1 cycle
= 5 + 2 * 10 = 25 rounds, the full-network baseline also 25 rounds):

* F (thop) = 14,469,632 conv/linear + 135,168 BatchNorm (4 x 33,792 BN outputs) + 1,280 average
  pool = 14,606,080 multiply-accumulates.
* Compute per client: full 25 * 8 * 500 * 3F = 4.382e12; FedPart (5 * 3F + 20 * 2F) * 8 * 500
  = 3.213e12 (paper: 4.38 vs 3.21 x 10^12); ratio 220,000 / 300,000 = 0.733.
* Upload, parameters only (BatchNorm running statistics are not sent): full 25 * 40 * 1,235,274 * 4
  = 4,941,096,000 bytes = 4.83 "GB"; FedPart (5 + 2) * 40 * 1,235,274 * 4 (each group is sent in 2
  rounds, and the groups partition the parameters) = 1.35 "GB"; ratio 7 / 25 = 0.28.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedsim.errors import FedsimError
from fedsim.models import _input_shape, forward_macs
from fedsim.models._common import probe_forward
from fedsim.models.base import FedModel

Phase = Literal["full", "partial"]

#: Cost of one training example in units of F (FedPart, section 5): forward + backward of the whole
#: network is 3F; with every layer but one frozen, 2F.
TRAIN_COST = {"full": 3, "partial": 2}

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORM_TYPES = (*_BN_TYPES, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOL = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Leaf modules thop registers as zero cost, or does not register (counted as zero, with a warning).
_ZERO_WITH_PARAMS = (nn.Embedding, nn.GroupNorm)
_NOT_IMPLEMENTED = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Upsample,
    nn.RNN,
    nn.GRU,
    nn.RNNCell,
    nn.GRUCell,
    nn.LSTMCell,
)


def _thop_lstm_step(n_in: int, h: int, bias: bool) -> int:
    """thop's count of one LSTM cell step: 4 gates of (n_in + h) * h + h (+ 2h with biases),
    then 3h for c' = f*c + i*g and h for h' = o * tanh(c')."""
    gate = (n_in + h) * h + h + (2 * h if bias else 0)
    return 4 * gate + 3 * h + h


def thop_layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Forward multiply-accumulates of one example per module, the way ``thop.profile`` counts.

    Counted by forward hooks on the leaf modules during one forward pass of a single all-zero
    example (float32, or int64 when the model's ``input_dtype`` is int64), in eval mode under
    ``torch.no_grad`` (the model's mode and torch's global RNG are left as they were). thop's
    rules (thop 0.1.1, ``thop/vision/basic_hooks.py``, ``calc_func.py``, ``rnn_hooks.py``):

    * Conv1d/2d/3d: output numel * (C_in / groups) * prod(kernel); the bias is not counted;
    * Linear: output numel * in_features; the bias is not counted;
    * BatchNorm, LayerNorm, InstanceNorm: 2 * input numel, doubled when affine (so 4 per element
      for an affine BatchNorm);
    * AvgPool: output numel; AdaptiveAvgPool: (prod(input spatial / output spatial) + 1) * output
      numel; PReLU: input numel; Softmax: rows * (3 * features - 1);
    * LSTM: per step, layer and direction 4 * ((in + H) * H + H + 2H) + 4H (2H only with biases);
    * ReLU, LeakyReLU, max-pooling, dropout, Embedding, GroupNorm, Identity, Flatten: 0;
    * functional calls (``F.relu``, residual additions, ``flatten``) are invisible to module
      hooks and count 0, as in thop.

    Args:
        model: the model; input_shape: one example's shape, e.g. ``(3, 32, 32)``.

    Returns:
        Module name -> MACs summed over its calls (modules that count 0 are left out).

    Raises:
        FedsimError: ``input_shape`` is malformed.
        TypeError: the model holds a module thop counts but this function does not (transposed
            convolutions, Upsample, RNN/GRU and RNN cells), or a parametrised module of a kind
            not listed above.
    """
    shape = _input_shape(input_shape)
    known = (
        *_CONV,
        nn.Linear,
        *_NORM_TYPES,
        *_AVG_POOL,
        *_ADAPTIVE_AVG_POOL,
        nn.PReLU,
        nn.Softmax,
        nn.LSTM,
        *_ZERO_WITH_PARAMS,
    )
    for name, sub in model.named_modules():
        if isinstance(sub, _NOT_IMPLEMENTED):
            raise TypeError(f"thop_layer_macs does not count {type(sub).__name__} ({name!r})")
        has_own = any(True for _ in sub.parameters(recurse=False))
        if has_own and not isinstance(sub, known):
            raise TypeError(f"thop_layer_macs cannot count a {type(sub).__name__} ({name!r})")

    names = {m: n for n, m in model.named_modules()}
    counts: dict[str, int] = {}

    def count(module: nn.Module, inputs: tuple, output: object) -> None:
        x = inputs[0]
        if isinstance(module, _CONV):
            k = math.prod(module.kernel_size)
            ops = output.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, nn.Linear):
            ops = output.numel() * module.in_features
        elif isinstance(module, _NORM_TYPES):
            affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
            ops = 2 * x.numel() * (2 if affine else 1)
        elif isinstance(module, _AVG_POOL):
            ops = output.numel()
        elif isinstance(module, _ADAPTIVE_AVG_POOL):
            kernel = math.prod(i / o for i, o in zip(x.shape[2:], output.shape[2:]))
            ops = int((kernel + 1) * output.numel())
        elif isinstance(module, nn.PReLU):
            ops = x.numel()
        elif isinstance(module, nn.Softmax):
            features = x.shape[module.dim]
            ops = (x.numel() // features) * (3 * features - 1)
        elif isinstance(module, nn.LSTM):
            if module.proj_size:
                raise TypeError("thop_layer_macs cannot count an LSTM with proj_size > 0")
            batched = x.dim() == 3
            steps = x.shape[1] if (module.batch_first and batched) else x.shape[0]
            batch = (x.shape[0] if module.batch_first else x.shape[1]) if batched else 1
            dirs = 2 if module.bidirectional else 1
            h = module.hidden_size
            per_step = sum(
                dirs * _thop_lstm_step(module.input_size if layer == 0 else h * dirs, h, module.bias)
                for layer in range(module.num_layers)
            )
            ops = per_step * steps * batch
        else:
            return
        name = names[module]
        counts[name] = counts.get(name, 0) + int(ops)

    counted = (
        *_CONV,
        nn.Linear,
        *_NORM_TYPES,
        *_AVG_POOL,
        *_ADAPTIVE_AVG_POOL,
        nn.PReLU,
        nn.Softmax,
        nn.LSTM,
    )
    probe_forward(model, shape, counted, count)
    return counts


def thop_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward multiply-accumulates of one example as thop counts them (sum of
    :func:`thop_layer_macs`; ResNet-8 on 3x32x32: 14,606,080).

    Raises:
        FedsimError: ``input_shape`` is malformed.
        TypeError: see :func:`thop_layer_macs`.
    """
    return sum(thop_layer_macs(model, input_shape).values())


def forward_cost(
    model: nn.Module, input_shape: Sequence[int], convention: Literal["thop", "fedsim"] = "thop"
) -> int:
    """Forward multiply-accumulates F of one example under ``convention``: ``"thop"``
    (:func:`thop_macs`, FedPart's numbers) or ``"fedsim"`` (``fedsim.models.forward_macs``:
    convolutions, linear layers and LSTMs only).

    Raises:
        FedsimError: unknown ``convention`` or malformed ``input_shape``.
        TypeError: a layer the chosen convention cannot count.
    """
    if convention == "thop":
        return thop_macs(model, input_shape)
    if convention == "fedsim":
        return forward_macs(model, input_shape)
    raise FedsimError(f"unknown MAC convention {convention!r}; use 'thop' or 'fedsim'")


def training_macs(forward: int, examples: int, local_epochs: int, phase: Phase) -> int:
    """Multiply-accumulates of one client's local training in one round:
    ``examples * local_epochs * c * forward`` with c = 3 for ``"full"``, 2 for ``"partial"``
    (FedPart, section 5).

    Raises:
        FedsimError: unknown ``phase``.
    """
    if phase not in TRAIN_COST:
        raise FedsimError(f"unknown phase {phase!r}; use 'full' or 'partial'")
    return int(examples) * int(local_epochs) * TRAIN_COST[phase] * int(forward)


def fedpart_gb(nbytes: float) -> float:
    """Bytes in the FedPart paper's "GB": bytes / 1e6 / 1024 (megabytes divided by 1024)."""
    return nbytes / 1e6 / 1024


# ---------------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class FedPartSchedule:
    """FedPart's round layout (docs/algorithms.md section 5).

    Attributes:
        warmup_rounds: W, full-network rounds at the start of every cycle (paper: 5).
        rounds_per_group: R, consecutive rounds each layer group is trained (paper: 2).
        cycles: C, cycles of W + R * G rounds.
        order: ``"sequential"`` (shallow to deep), ``"reverse"``, ``"random"`` (a fresh
            permutation of the groups each cycle, drawn from the generator passed to
            :func:`fedpart_schedule`), or an explicit permutation of group indices used in every
            cycle.
    """

    warmup_rounds: int = 5
    rounds_per_group: int = 2
    cycles: int = 1
    order: str | tuple[int, ...] = "sequential"


@dataclass(frozen=True)
class RoundSpec:
    """One round of a schedule: 0-based ``round`` and ``cycle``; ``phase`` ``"full"`` or
    ``"partial"``; ``group`` the index into ``model.layer_groups()`` trained in a partial round,
    else None."""

    round: int
    cycle: int
    phase: Phase
    group: int | None = None


def _positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise FedsimError(f"{name} must be an integer >= {minimum} (got {value!r}); fix {name}")
    return int(value)


def fedpart_schedule(
    num_groups: int, schedule: FedPartSchedule, rng: np.random.Generator | None = None
) -> tuple[RoundSpec, ...]:
    """Every round of a FedPart run: per cycle W ``full`` rounds, then R ``partial`` rounds for
    each group in the cycle's order; C * (W + R * G) rounds in all (ResNet-8: 25 per cycle).

    Args:
        num_groups: G, the model's layer-group count.
        schedule: W, R, C and the order.
        rng: numpy generator the ``"random"`` order draws one permutation per cycle from (e.g.
            ``fedsim.rng.numpy_rng(seed, stream)``); required for that order only.

    Raises:
        FedsimError: a count is not a positive integer (W may be 0), the order is unknown or not
            a permutation of range(G), or ``"random"`` without ``rng``.
    """
    g = _positive("num_groups", num_groups)
    w = _positive("warmup_rounds", schedule.warmup_rounds, minimum=0)
    r = _positive("rounds_per_group", schedule.rounds_per_group)
    c = _positive("cycles", schedule.cycles)
    order = schedule.order
    if order == "random" and rng is None:
        raise FedsimError("order 'random' needs a generator; pass rng=fedsim.rng.numpy_rng(...)")
    if isinstance(order, str) and order not in ("sequential", "reverse", "random"):
        raise FedsimError(f"unknown FedPart order {order!r}; use 'sequential', 'reverse' or 'random'")
    if not isinstance(order, str) and sorted(order) != list(range(g)):
        raise FedsimError(
            f"FedPart order {tuple(order)!r} is not a permutation of the {g} group indices 0..{g - 1}"
        )
    rounds: list[RoundSpec] = []
    for cycle in range(c):
        if order == "sequential":
            groups = list(range(g))
        elif order == "reverse":
            groups = list(range(g - 1, -1, -1))
        elif order == "random":
            groups = [int(i) for i in rng.permutation(g)]
        else:
            groups = [int(i) for i in order]
        for _ in range(w):
            rounds.append(RoundSpec(len(rounds), cycle, "full"))
        for group in groups:
            for _ in range(r):
                rounds.append(RoundSpec(len(rounds), cycle, "partial", group))
    return tuple(rounds)


# ---------------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class RoundProjection:
    """Projected cost of one round, summed over its cohort.

    Attributes:
        round, cycle, phase, group: as in :class:`RoundSpec`; group_name: the group's name or None.
        bytes_up / bytes_down: bytes sent client->server / server->client by the whole cohort.
        macs: multiply-accumulates of the cohort's local training.
    """

    round: int
    cycle: int
    phase: Phase
    group: int | None
    group_name: str | None
    bytes_up: int
    bytes_down: int
    macs: int


@dataclass(frozen=True)
class RunProjection:
    """Projected communication and computation of a run (:func:`project_run`).

    Attributes:
        forward_macs: F, forward multiply-accumulates of one example.
        params: parameter count of the model.
        rounds: one :class:`RoundProjection` per round.
        bytes_up, bytes_down, macs: totals over all rounds and clients.
        per_client_bytes_up, per_client_bytes_down, per_client_macs: totals divided by the client
            count: exact per client when every client takes part in every round, else the
            expectation over uniform cohort sampling.
    """

    forward_macs: int
    params: int
    rounds: tuple[RoundProjection, ...]
    bytes_up: int
    bytes_down: int
    macs: int
    per_client_bytes_up: float
    per_client_bytes_down: float
    per_client_macs: float

    def to_frame(self):
        """The rounds as a pandas DataFrame (one row per round, the fields of
        :class:`RoundProjection` as columns)."""
        import pandas as pd

        return pd.DataFrame([vars(r) for r in self.rounds])


def _nbytes(state: dict[str, torch.Tensor], keys: Sequence[str]) -> int:
    return sum(state[k].numel() * state[k].element_size() for k in keys)


def project_run(
    model: FedModel,
    input_shape: Sequence[int],
    *,
    num_clients: int,
    clients_per_round: int,
    examples_per_client: int,
    local_epochs: int,
    schedule: FedPartSchedule | Sequence[RoundSpec] | None = None,
    rounds: int | None = None,
    rng: np.random.Generator | None = None,
    share_bn_stats: bool = False,
    partial_download: Literal["model", "group"] = "model",
    convention: Literal["thop", "fedsim"] = "thop",
    upload_bytes: Callable[[dict[str, torch.Tensor]], int] | None = None,
) -> RunProjection:
    """Project the bytes and multiply-accumulates of a FedPart or full-network run, per round,
    in total and per client, without training (docs/algorithms.md sections 5 and 6).

    Per participating client and round (FedPart, section 5):

    * compute = examples_per_client * local_epochs * (3F full | 2F partial);
    * upload = bytes of the trained tensors it sends: every parameter in a full round, the active
      group's parameters in a partial round, plus (with ``share_bn_stats``) the BatchNorm
      running statistics and counters of the same layers; numel x element size;
    * download = the whole model (parameters, plus BN statistics when shared) every round, or with
      ``partial_download="group"`` only the active group in partial rounds.

    Args:
        model: a fedsim model (its ``layer_groups()`` define the partial rounds).
        input_shape: one example's shape, e.g. ``(3, 32, 32)``.
        num_clients: clients in the federation; clients_per_round: the cohort size (<= clients).
        examples_per_client: training examples each client holds; local_epochs: passes per round.
        schedule: a :class:`FedPartSchedule` (laid out by :func:`fedpart_schedule`) or an
            explicit sequence of :class:`RoundSpec`; give this or ``rounds``.
        rounds: full-network training for this many rounds (FedPart's baseline runs as many
            rounds as FedPart: C * (W + R * G)).
        rng: generator for ``order="random"``.
        share_bn_stats: BatchNorm running statistics cross the wire with their layer (FedPart's
            authors' code keeps them local, and the paper's table counts parameters only).
        partial_download: what the server sends in a partial round.
        convention: how F is counted: ``"thop"`` (the paper's) or ``"fedsim"``.
        upload_bytes: bytes of one client's upload of the given tensors (name -> tensor) when
            an uplink codec encodes them (:func:`fedsim.wire.upload_bytes`); None: numel x
            element size.

    Returns:
        A :class:`RunProjection` (bytes in bytes, compute in multiply-accumulates).

    Raises:
        FedsimError: counts not positive integers, a cohort larger than the federation, both or
            neither of ``schedule`` and ``rounds``, an unknown ``partial_download`` or
            ``convention``, a schedule group outside the model's groups, or a model without
            layer groups.
    """
    n = _positive("num_clients", num_clients)
    k = _positive("clients_per_round", clients_per_round)
    if k > n:
        raise FedsimError(f"clients_per_round ({k}) exceeds num_clients ({n}); lower clients_per_round")
    examples = _positive("examples_per_client", examples_per_client)
    epochs = _positive("local_epochs", local_epochs)
    if partial_download not in ("model", "group"):
        raise FedsimError(f"unknown partial_download {partial_download!r}; use 'model' or 'group'")
    if not isinstance(model, FedModel):
        raise FedsimError(f"project_run needs a fedsim model (got {type(model).__name__}); use build_model")
    groups = model.layer_groups()
    if (schedule is None) == (rounds is None):
        raise FedsimError("give either schedule (FedPart) or rounds (full-network training)")
    if rounds is not None:
        specs = tuple(RoundSpec(r, 0, "full") for r in range(_positive("rounds", rounds)))
    elif isinstance(schedule, FedPartSchedule):
        specs = fedpart_schedule(len(groups), schedule, rng)
    else:
        specs = tuple(schedule)
        for s in specs:
            if s.phase == "partial" and (s.group is None or not 0 <= s.group < len(groups)):
                raise FedsimError(
                    f"round {s.round} trains group {s.group!r}, but the model has groups "
                    f"0..{len(groups) - 1}; fix the schedule"
                )

    forward = forward_cost(model, input_shape, convention)
    state = model.state_dict()
    param_keys = {name for name, _ in model.named_parameters()}

    def sent(keys: Sequence[str]) -> list[str]:
        return [key for key in keys if key in param_keys or share_bn_stats]

    def up_bytes(keys: Sequence[str]) -> int:
        return _nbytes(state, keys) if upload_bytes is None else upload_bytes({k: state[k] for k in keys})

    all_keys = sent([key for grp in groups for key in grp.tensors])
    model_bytes = _nbytes(state, all_keys)
    out: list[RoundProjection] = []
    for s in specs:
        if s.phase == "full":
            up, down = up_bytes(all_keys), model_bytes
            name = None
        else:
            grp = groups[s.group]
            up = up_bytes(sent(grp.tensors))
            down = _nbytes(state, sent(grp.tensors)) if partial_download == "group" else model_bytes
            name = grp.name
        per_client = training_macs(forward, examples, epochs, s.phase)
        out.append(
            RoundProjection(
                round=s.round,
                cycle=s.cycle,
                phase=s.phase,
                group=s.group,
                group_name=name,
                bytes_up=k * up,
                bytes_down=k * down,
                macs=k * per_client,
            )
        )
    total_up = sum(r.bytes_up for r in out)
    total_down = sum(r.bytes_down for r in out)
    total_macs = sum(r.macs for r in out)
    return RunProjection(
        forward_macs=forward,
        params=sum(p.numel() for p in model.parameters()),
        rounds=tuple(out),
        bytes_up=total_up,
        bytes_down=total_down,
        macs=total_macs,
        per_client_bytes_up=total_up / n,
        per_client_bytes_down=total_down / n,
        per_client_macs=total_macs / n,
    )
