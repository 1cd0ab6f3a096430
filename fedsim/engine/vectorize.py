"""Vectorised cohorts: a worker trains the clients of one call in lockstep as one stacked model.

The clients of a round share the architecture and the plan, so their parameters and buffers are
stacked along a leading client axis (K, *shape), the model runs on all of them at once with
``torch.func.functional_call`` under ``torch.func.vmap``, and one ``torch.optim.SGD`` or
``torch.optim.Adam`` steps the stacked trainable tensors. Both are elementwise (momentum, weight
decay and Adam's moments included), so each client's slice follows exactly its own update.

Each client keeps its own minibatches. Its epoch order comes from its own
(seed, "shuffle", round, client) generator with the same ``randperm`` calls as the per-client path
(:meth:`fedsim.algorithms.base.Algorithm.local_update`), and its augmentation from its own
(seed, "augment", round, client) generator. The last, smaller batch of an epoch is a step of its
own. An epoch runs max_i s_i steps, where client i takes s_i = ceil(n_i / B).

* Models whose examples do not see each other (no BatchNorm): every batch is padded to the batch
  size B and its losses are weighted sums with weights 1/b over the b real examples, 0 over
  padding (a fixed width, so a client's arithmetic does not depend on its stack-mates). One
  ``vmap`` call per step.
* BatchNorm models (:func:`mixes_batch`, or any model whose outputs move when :func:`template`'s
  probe pads a batch): padding would enter the batch statistics, so a step makes
  one call per distinct batch length, over the clients whose batch has that length (their
  parameters gathered, their running statistics written back). Each client keeps its own batch
  statistics and its own running statistics.

At a step where a client has no batch left it is masked: its parameters and momentum buffers are
restored after the optimiser's step, so weight decay and momentum do not move it. Adam's step
count (its bias correction) is one per tensor, so under ``optimizer: adam`` only clients with the
same number of steps per epoch are stacked together and no client is masked
(:func:`train_stacked`). The sum over clients' objectives is differentiated once; a client's slice
receives only its own gradient.

The algorithm supplies the local objective in functional form
(:meth:`~fedsim.algorithms.base.Algorithm.stacked_begin`, ``stacked_loss``, ``stacked_finish``):
FedProx adds its proximal term, SCAFFOLD a linear term whose gradient is its correction
c - c_i, MOON its contrastive term against the shared global and each client's stacked
previous model; FedPart stacks its local objective with only the active layer group trainable.
Client states (SCAFFOLD's c_i, MOON's previous model, BatchNorm statistics under
``bn_stats: local``) go in and come out per client as on the per-client path.

Results equal the per-client path up to floating-point reassociation (the tests compare every
stacked call with the same clients trained one by one). They do not depend on how clients are
grouped into calls or chunks: a lone client (or a lone batch length) is stacked with a copy of
itself, whose results are dropped, so every ``vmap`` call has at least two members. The Ray and
sequential backends therefore stay bit-identical.

Stacking applies when the algorithm is ``vectorizable`` (FedAvg, FedProx, the server optimisers,
FedNova, FedMedian, SCAFFOLD, MOON, and FedPart over any of them), the model has no dropout
(a stacked forward pass cannot draw each client's masks from its own seeded generator), the
optimiser is SGD or Adam, and nothing is sent to a client alone. FedMA's and PFNM's clients have
different widths and train one by one (:func:`stackable`).

Dropout masks are drawn on the CPU from each client's (seed, "dropout", round, client) generator,
as the per-client path draws them on a CPU, so the two paths agree there. On a GPU the per-client
path's dropout runs torch's fused CUDA kernel from the CUDA generator: both paths then draw
per-client, reproducible masks, but not the same ones.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedsim import params as P
from fedsim.algorithms import Algorithm, ClientResult, ClientTask, StackedContext
from fedsim.config import RunConfig
from fedsim.engine.client import trainable_count, trainable_names, trained_examples, training_macs
from fedsim.rng import torch_rng

if TYPE_CHECKING:
    from fedsim.engine.client import ClientRunner

#: dropout modules whose masks a stacked update draws per client (:class:`_SeededDropout`)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
#: modules a stacked update cannot run: other dropouts (their draws differ), recurrent layers (no
#: ``vmap`` rule for ``aten::lstm``; their inter-layer dropout draws from the global generator too)
_UNSTACKABLE_MODULES = (nn.AlphaDropout, nn.FeatureAlphaDropout, nn.RNNBase)


def model_stackable(model: nn.Module) -> bool:
    """Whether ``model`` has no module a stacked update cannot run: recurrent layers, alpha
    dropout. (Plain and feature dropout are stacked with per-client masks; :func:`template`
    also runs the model once under ``vmap`` before the first stacked update.)"""
    return not any(isinstance(m, _UNSTACKABLE_MODULES) for m in model.modules())


class _SeededDropout(nn.Module):
    """Stands in for a dropout module in a stacked update: multiplies its input by the ``mask``
    that each call supplies, one per client, drawn from the client's own dropout generator
    exactly as ``torch.nn.functional.dropout`` draws on the CPU (bernoulli(1 - p) / (1 - p), per
    element, or per channel for ``Dropout1d/2d/3d``). In eval mode it is the identity."""

    def __init__(self, p: float, feature: bool):
        super().__init__()
        self.p, self.feature = p, feature
        self.register_buffer("mask", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask if self.training and self.p > 0 else x


class Template:
    """The model a stacked update runs with ``functional_call``: the worker's model, or a copy
    with every dropout replaced by a :class:`_SeededDropout`.

    Attributes:
        module: the model to call. dropouts: (mask key, p, feature, per-example input shape) of
            each dropout, in the order a forward pass calls them. exact: its examples see each
            other in training mode (BatchNorm, or any layer whose outputs for a batch moved
            when the probe padded it), so its batches are never padded.
    """

    def __init__(
        self, module: nn.Module, dropouts: list[tuple[str, float, bool, tuple[int, ...]]], exact: bool
    ):
        self.module, self.dropouts, self.exact = module, dropouts, exact

    def masks(
        self, generator: torch.Generator, b: int, width: int, device: torch.device
    ) -> list[torch.Tensor]:
        """One client's masks for one batch of ``b`` real examples padded to ``width``: for each
        dropout, ``(width, *shape)`` float32 (``(width, C, 1, ...)`` for feature dropout), drawn
        from ``generator`` in the per-client path's order; padding rows are 0."""
        out = []
        for _, p, feature, shape in self.dropouts:
            noise_shape = (b, shape[0], *[1] * (len(shape) - 1)) if feature else (b, *shape)
            if p <= 0:  # F.dropout draws nothing at p = 0 (identity) and p = 1 (zeros)
                noise = torch.ones(noise_shape)
            elif p >= 1:
                noise = torch.zeros(noise_shape)
            else:
                noise = torch.empty(noise_shape).bernoulli_(1 - p, generator=generator).div_(1 - p)
            mask = torch.zeros((width, *noise_shape[1:]))
            mask[:b] = noise
            out.append(mask.to(device))
        return out


def template(runner: ClientRunner, model: nn.Module) -> Template | None:
    """The :class:`Template` of ``model``, built once per model and runner, or None when the
    model cannot be stacked: a module of :func:`model_stackable`'s list, a dropout called other
    than once per forward pass, or an operation without a ``vmap`` rule (found by running two
    stacked copies on two of client 0's examples)."""
    if id(model) not in runner.templates:
        runner.templates[id(model)] = _build_template(runner, model)
    return runner.templates[id(model)]


def _build_template(runner: ClientRunner, model: nn.Module) -> Template | None:
    if not model_stackable(model):
        return None
    module = model
    names = [n for n, m in model.named_modules() if isinstance(m, _DROPOUTS)]
    if names:
        module = copy.deepcopy(model)
        for n in names:
            old = module.get_submodule(n)
            parent, _, leaf = n.rpartition(".")
            seeded = _SeededDropout(old.p, not isinstance(old, nn.Dropout))
            setattr(module.get_submodule(parent) if parent else module, leaf, seeded)
    calls: list[tuple[str, tuple[int, ...]]] = []
    hooks = [
        module.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: calls.append((n, tuple(args[0].shape[1:])))
        )
        for n in names
    ]
    idx = np.asarray(
        runner.dataset.client_indices[0][:2] if len(runner.dataset.client_indices[0]) >= 2 else [0, 1]
    )
    x = torch.from_numpy(runner.dataset.train.inputs(idx)).to(runner.device)
    tensors = {n: t.detach() for n, t in module.state_dict().items()}

    def forward(inputs: torch.Tensor) -> torch.Tensor:  # on copies: buffers stay as they are
        return functional_call(module, {n: t.clone() for n, t in tensors.items()}, (inputs,))

    try:
        module.train()
        with torch.no_grad():
            alone = forward(x)  # also records the shape at each dropout
            order = list(calls)
            shapes = dict(order)
            if sorted(n for n, _ in order) != sorted(names):
                return None  # a dropout called twice, or never
            padded = forward(torch.cat([x, torch.zeros_like(x)]))[: len(x)]
            masks = {f"{n}.mask": torch.ones((2, len(x), *shapes[n]), device=x.device) for n in names}
            stacked = {n: torch.stack([t, t]) for n, t in tensors.items()}
            vmap(lambda t, x: functional_call(module, t, (x,)))({**stacked, **masks}, torch.stack([x, x]))
            # padding moved the real examples' outputs: its examples see each other (BatchNorm)
            exact = mixes_batch(model) or not torch.allclose(alone, padded, rtol=1e-4, atol=1e-5)
    except Exception:  # no vmap rule (or the model cannot run on a batch of 2): train one by one
        return None
    finally:
        for h in hooks:
            h.remove()
    return Template(
        module,
        [
            (f"{n}.mask", module.get_submodule(n).p, module.get_submodule(n).feature, shapes[n])
            for n, _ in order
        ],
        exact,
    )


def mixes_batch(model: nn.Module) -> bool:
    """Whether ``model`` has a layer through which an example's output depends on the other
    examples of its batch in training mode (BatchNorm's batch statistics, InstanceNorm's running
    statistics): such a model's batches cannot be padded. (:func:`template` also pads a probe
    batch, to catch layers this list does not know.)"""
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    return any(isinstance(m, norms) for m in model.modules())


#: ``engine.vectorize: auto`` on a CPU stacks models of at most this many forward
#: multiply-accumulates per example (F). Measured with benchmarks/bench_local_training.py on a
#: 2-core CPU, one thread (docs/performance.md): stacked / one by one 0.49-0.85 for the digits CNN
#: (F = 0.34 M) and 0.52-0.78 for a small ResNet-8 (0.51 M), 1.0-1.3 for a 5x5 CNN at 0.88 M and
#: about 2.2 for CIFAR's 32/64-channel 5x5 CNN (7.9 M): per-client convolutions become one grouped
#: convolution, which a CPU runs more slowly than the separate ones once they are large.
AUTO_MAX_MACS = 600_000


def stackable(
    runner: ClientRunner, run: RunConfig, algo: Algorithm, tasks: list[ClientTask], states: list, extras: list
) -> bool:
    """Whether the tasks of one call are trained as one stacked model (see the module docstring).

    ``engine.vectorize: never`` turns it off; ``always`` stacks wherever the conditions hold
    (and the driver reports once an algorithm that cannot); ``auto`` stacks where they hold and
    either the worker's device is a GPU or the model's forward pass costs at most
    :data:`AUTO_MAX_MACS` per example (where stacking was measured faster on a CPU)."""
    mode = runner.experiment.engine.vectorize
    if mode == "never" or not tasks or not algo.vectorizable:
        return False
    plan = tasks[0].plan
    if any(t.plan is not plan and t.plan != plan for t in tasks):
        return False
    if plan.pooled or plan.own_init or run.optimizer not in ("sgd", "adam"):
        return False
    if any(e for e in extras):
        return False
    model = runner.model(None)
    if mode == "auto" and runner.device.type == "cpu" and runner.forward_macs(None, model) > AUTO_MAX_MACS:
        return False
    return template(runner, model) is not None


def train_stacked(
    runner: ClientRunner,
    run: RunConfig,
    algo: Algorithm,
    tasks: list[ClientTask],
    received: Any,
    states: list | None = None,
) -> list[ClientResult]:
    """Train ``tasks`` (clients of one round, one plan) as stacked models, in chunks of at most
    ``engine.vectorize_max_clients``; their :class:`~fedsim.algorithms.base.ClientResult` s in
    task order, with the same fields (state included) as the per-client path. ``seconds`` is the
    chunk's wall time divided evenly over its clients.

    Args:
        states: each task's stored client state (None entries for none), or None for no state.

    Under ``optimizer: adam`` only clients that take the same number of steps per epoch are
    stacked together (Adam's step count, which sets its bias correction, is one per tensor), so
    no client is ever masked. A chunk that runs out of GPU memory is split in halves.
    """
    states = list(states) if states is not None else [None] * len(tasks)
    limit = runner.experiment.engine.vectorize_max_clients
    if run.optimizer == "adam":
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(tasks):
            n = len(runner.dataset.client_indices[t.client_id])
            groups.setdefault(math.ceil(n / run.batch_size), []).append(i)
        parts = list(groups.values())
    else:
        parts = [list(range(len(tasks)))]
    out: list[ClientResult | None] = [None] * len(tasks)
    for part in parts:
        for start in range(0, len(part), limit):
            rows = part[start : start + limit]
            for i, res in zip(rows, _train_fitting(runner, run, algo, tasks, received, states, rows)):
                out[i] = res
    return out  # type: ignore[return-value]


def _train_fitting(runner, run, algo, tasks, received, states, rows: list[int]) -> list[ClientResult]:
    """:func:`_train_chunk` on ``tasks[rows]``; a chunk that runs out of GPU memory is trained as
    two halves instead, recursively down to one client. Results do not depend on the chunking,
    so this changes no number; it only lets ``vectorize_max_clients`` be larger than what fits.

    Raises:
        torch.OutOfMemoryError: a single client does not fit.
    """
    try:
        return _train_chunk(runner, run, algo, [tasks[i] for i in rows], received, [states[i] for i in rows])
    except torch.OutOfMemoryError:
        if len(rows) == 1:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(rows) // 2
    return _train_fitting(runner, run, algo, tasks, received, states, rows[:half]) + _train_fitting(
        runner, run, algo, tasks, received, states, rows[half:]
    )


class _ClientData(NamedTuple):
    """One stacked client's examples (``x``: ``(n, *input_shape)``, ``y``: ``(n,)`` int64) and
    its own generators: epoch shuffles, augmentation (a batch transform) and dropout masks."""

    x: torch.Tensor
    y: torch.Tensor
    shuffle: torch.Generator
    augment: Callable[[torch.Tensor], torch.Tensor]
    dropout: torch.Generator


def _train_chunk(
    runner: ClientRunner,
    run: RunConfig,
    algo: Algorithm,
    tasks: list[ClientTask],
    received: Any,
    states: list,
) -> list[ClientResult]:
    t0 = time.perf_counter()
    plan = tasks[0].plan
    model = runner.model(None)
    down = runner.tensors(received)
    members = tasks if len(tasks) > 1 else tasks * 2  # a lone client is stacked with a copy
    member_states = states if len(tasks) > 1 else states * 2
    k = len(members)
    device = runner.device
    seed = runner.experiment.seed
    buffers = [n for n, _ in model.named_buffers()]
    trainable = trainable_names(model, plan)
    current = model.state_dict()
    starts = [
        algo.client_weights(t, down, s, runner._fresh_weights)[1] for t, s in zip(members, member_states)
    ]
    tensors = {
        n: torch.stack([w[n].detach() if n in w else current[n].detach() for w in starts]).to(device)
        for n in current
    }
    for n in trainable:
        tensors[n].requires_grad_(True)
    tpl = template(runner, model)
    assert tpl is not None  # stackable() said so
    sctx = StackedContext(model=tpl.module, received=down, plan=plan, trainable=trainable)
    aux = algo.stacked_begin(sctx, member_states)
    data = [
        _ClientData(
            *runner.examples(t),
            shuffle=torch_rng(seed, "shuffle", t.round, t.client_id),
            augment=runner.augment(t),
            dropout=torch_rng(seed, "dropout", t.round, t.client_id),
        )
        for t in members
    ]
    stepped = [tensors[n] for n in trainable]
    if run.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(stepped, lr=plan.lr, weight_decay=plan.weight_decay)
    else:
        opt = torch.optim.SGD(stepped, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)

    def objective(t, x, y, w, a):
        return algo.stacked_loss(sctx, t, x, y, w, a)

    per_client = vmap(objective)
    bs = run.batch_size
    shape = tuple(runner.dataset.input_shape)
    exact = tpl.exact  # BatchNorm: no padding, one call per batch length
    # sum over steps of (batch CE x batch size) per client, in float64 as the per-client path's
    # Python floats, kept on the device so that a GPU is not synchronised at every step
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    seen, steps = np.zeros(k), np.zeros(k, dtype=np.int64)
    caps = [t.max_steps for t in members]
    tpl.module.train()
    for _ in range(plan.local_epochs):
        orders = [torch.randperm(d.x.shape[0], generator=d.shuffle) for d in data]
        counts = [math.ceil(d.x.shape[0] / bs) for d in data]
        for step in range(max(counts)):
            batches = [  # a client past its max_steps (partial work) takes no more steps
                o[step * bs : (step + 1) * bs] if caps[i] is None or steps[i] < caps[i] else o[:0]
                for i, o in enumerate(orders)
            ]
            active = [i for i, b in enumerate(batches) if len(b)]
            opt.zero_grad(set_to_none=True)
            for rows, width in _calls(batches, exact, bs):
                xb, yb, wb, masks = _batch(data, batches, rows, width, shape, device, tpl)
                whole = rows == list(range(k))
                sub = tensors if whole else {n: v[rows] for n, v in tensors.items()}
                if masks:
                    sub = {**sub, **masks}
                sub_aux = aux if whole else {n: v[rows] for n, v in aux.items()}
                real = len(set(rows))  # a lone row is run twice; only its first copy counts
                obj, ce = per_client(sub, xb, yb, wb, sub_aux)
                obj[:real].sum().backward()
                if not whole:  # buffers (BatchNorm's running statistics) moved in the call
                    with torch.no_grad():
                        for n in buffers:
                            tensors[n][rows[:real]] = sub[n][:real]
                sizes = torch.tensor(
                    [len(batches[i]) for i in rows[:real]], dtype=torch.float64, device=device
                )
                loss_sum.index_add_(
                    0, torch.tensor(rows[:real], device=device), ce[:real].detach().double() * sizes
                )
            idle = [i for i in range(k) if i not in set(active)]
            kept = _snapshot(opt, tensors, trainable, idle)
            opt.step()
            _restore(opt, tensors, trainable, kept)
            for i in active:
                seen[i] += len(batches[i])
                steps[i] += 1
    losses = loss_sum.cpu().numpy()
    seconds = (time.perf_counter() - t0) / len(tasks)
    forward = runner.forward_macs(None, model)
    n_trainable = trainable_count(model, trainable)
    results = []
    for i, t in enumerate(tasks):
        final = {n: v.detach()[i] for n, v in tensors.items()}
        upload_t, new_state, frozen = algo.stacked_finish(sctx, t, states[i], final, int(steps[i]))
        upload = P.to_numpy(upload_t)
        n_i = int(data[i].x.shape[0])
        results.append(
            ClientResult(
                client_id=t.client_id,
                round=t.round,
                upload=upload,
                n_examples=n_i,
                train_loss=float(losses[i] / max(seen[i], 1)),
                bytes_up=P.nbytes(upload),
                bytes_down=P.nbytes(received),
                seconds=seconds,
                worker=runner.worker_id,
                attempt=t.attempt,
                state=new_state,
                macs=training_macs(trained_examples(n_i, t, bs, int(steps[i])), plan, frozen, forward),
                trainable_params=n_trainable,
                local_steps=int(steps[i]),
            )
        )
    return results


def _calls(batches: list[torch.Tensor], exact: bool, bs: int) -> list[tuple[list[int], int]]:
    """The vmap calls of one step: (stack rows, batch width) pairs. Padded (``exact`` False): one
    call over every row at width ``bs`` (idle rows are all padding). Exact: one call per distinct
    batch length over the rows that have it, a lone row listed twice (so no call stacks fewer
    than two clients); idle rows are in no call."""
    if not exact:
        return [(list(range(len(batches))), bs)]
    by_len: dict[int, list[int]] = {}
    for i, b in enumerate(batches):
        if len(b):
            by_len.setdefault(len(b), []).append(i)
    return [
        (rows if len(rows) > 1 else rows * 2, width) for width, rows in sorted(by_len.items(), reverse=True)
    ]


def _batch(data, batches, rows, width, shape, device, tpl: Template):
    """``(R, width, *shape)`` inputs, ``(R, width)`` labels and ``(R, width)`` weights (1/b on a
    row's b real examples, 0 on padding) for the stack rows ``rows``, each row's examples
    augmented with its own generator; and the dropout masks, mask key -> ``(R, width, ...)``,
    each row's drawn from its own dropout generator (empty without dropout)."""
    r = len(rows)
    xb = torch.zeros((r, width, *shape), dtype=data[0].x.dtype, device=device)
    yb = torch.zeros((r, width), dtype=torch.int64, device=device)
    wb = torch.zeros((r, width), dtype=torch.float32, device=device)
    masks: list[list[torch.Tensor]] = []
    done: dict[int, int] = {}
    for j, i in enumerate(rows):
        b = batches[i]
        if i in done:  # the repeated lone row: the same (already augmented) batch and masks
            xb[j], yb[j], wb[j] = xb[done[i]], yb[done[i]], wb[done[i]]
            masks.append(masks[done[i]])
            continue
        d = data[i]
        if len(b):
            xb[j, : len(b)] = d.augment(d.x[b])
            yb[j, : len(b)] = d.y[b]
            wb[j, : len(b)] = 1.0 / len(b)
            masks.append(tpl.masks(d.dropout, len(b), width, device))
        else:  # an idle row draws nothing
            masks.append(tpl.masks(torch.Generator(), 0, width, device))
        done[i] = j
    stacked = {key: torch.stack([m[d] for m in masks]) for d, (key, *_) in enumerate(tpl.dropouts)}
    return xb, yb, wb, stacked


def _snapshot(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], trainable, idle: list[int]):
    """The idle clients' slices of every trained tensor and momentum buffer, before a step."""
    if not idle:
        return None
    rows = torch.tensor(idle)
    kept = []
    for n in trainable:
        w = tensors[n]
        buf = opt.state.get(w, {}).get("momentum_buffer")
        kept.append((w, w.detach()[rows].clone(), None if buf is None else buf[rows].clone()))
    return rows, kept


def _restore(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], trainable, kept) -> None:
    """Put the idle clients' slices back as they were before the step: they took no step. A
    momentum buffer created by this step is zero for them (the per-client path starts a
    client's buffer at its first gradient, which equals 0 * momentum + gradient)."""
    if kept is None:
        return
    rows, saved = kept
    with torch.no_grad():
        for w, before, buf_before in saved:
            w[rows] = before
            buf = opt.state.get(w, {}).get("momentum_buffer")
            if buf is not None:
                buf[rows] = 0 if buf_before is None else buf_before
