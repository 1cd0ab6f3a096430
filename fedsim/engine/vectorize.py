"""Vectorised cohorts: a worker trains the clients of one call in lockstep as one stacked model.

The clients of a round share the architecture and the plan, so their parameters are stacked
along a leading client axis (K, *shape), the model runs on all of them at once with
``torch.func.functional_call`` under ``torch.func.vmap``, and one ``torch.optim.SGD`` steps the
stacked tensors. SGD with momentum and weight decay is elementwise, so each client's slice follows
exactly its own update.

Each client keeps its own minibatches. Its epoch order comes from its own
(seed, "shuffle", round, client) generator with the same ``randperm`` calls as the per-client path
(:meth:`fedsim.algorithms.base.Algorithm.local_update`). The last, smaller batch of an epoch is a
step of its own: every batch is padded to the batch size B and its cross-entropy is a weighted
sum with weights 1/b over the b real examples, 0 over padding (a fixed width, so a client's
arithmetic does not depend on which clients it is stacked with). An epoch runs max_i s_i steps, where
client i takes s_i = ceil(n_i / B). At a step where a client has no batch left it is masked: its
parameters and momentum buffers are restored after the optimiser's step, so weight decay and
momentum do not move it. The sum over clients' objectives is differentiated once; a client's
slice receives only its own gradient.

Results equal the per-client path up to floating-point reassociation (the tests check allclose).
They do not depend on how clients are grouped into calls or chunks: a lone client is stacked with
a copy of itself, whose results are dropped, so every stack has at least two members. The Ray
and sequential backends therefore stay bit-identical.

Stacking applies when the algorithm says its clients run FedAvg's minibatch SGD
(``Algorithm.vectorizable``: FedAvg, FedProx, the server optimisers, FedNova, FedMedian) on a
model without buffers (no BatchNorm statistics) or dropout, with ``optimizer: sgd``, every
parameter trainable, no augmentation, no client state and nothing sent to a client alone.
Anything else trains client by client (:func:`stackable`).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from fedsim import params as P
from fedsim.algorithms import Algorithm, ClientResult, ClientTask
from fedsim.config import RunConfig
from fedsim.rng import torch_rng

if TYPE_CHECKING:
    from fedsim.engine.client import ClientRunner

#: module types whose per-client behaviour a stacked forward pass would not reproduce
_UNSTACKABLE_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.GroupNorm)


def model_stackable(model: nn.Module) -> bool:
    """Whether ``model`` has no buffers (BatchNorm's running statistics) and no dropout or
    normalisation layer whose statistics or randomness are per client."""
    return not any(True for _ in model.buffers()) and not any(
        isinstance(m, _UNSTACKABLE_MODULES) for m in model.modules()
    )


def stackable(
    runner: ClientRunner, run: RunConfig, algo: Algorithm, tasks: list[ClientTask], states: list, extras: list
) -> bool:
    """Whether the tasks of one call are trained as one stacked model (see the module docstring).

    ``engine.vectorize: never`` turns it off; ``auto`` and ``always`` both stack wherever the
    conditions hold (``always`` on an algorithm that cannot is reported once by the driver)."""
    if runner.experiment.engine.vectorize == "never" or not tasks or not algo.vectorizable:
        return False
    plan = tasks[0].plan
    if any(t.plan is not plan and t.plan != plan for t in tasks):
        return False
    if plan.pooled or plan.own_init or plan.trainable is not None or plan.upload is not None:
        return False
    if run.optimizer != "sgd" or algo.stateful or runner.dataset.augment is not None:
        return False
    if any(s is not None for s in states) or any(e for e in extras):
        return False
    return model_stackable(runner.model(None))


def train_stacked(
    runner: ClientRunner, run: RunConfig, algo: Algorithm, tasks: list[ClientTask], received: Any
) -> list[ClientResult]:
    """Train ``tasks`` (clients of one round, one plan) as stacked models, in chunks of at most
    ``engine.vectorize_max_clients``; their :class:`~fedsim.algorithms.base.ClientResult` s in
    task order, with the same fields as the per-client path. ``seconds`` is the chunk's wall time
    divided evenly over its clients."""
    limit = max(2, runner.experiment.engine.vectorize_max_clients)
    out: list[ClientResult] = []
    for start in range(0, len(tasks), limit):
        out += _train_chunk(runner, run, algo, tasks[start : start + limit], received)
    return out


def _train_chunk(
    runner: ClientRunner, run: RunConfig, algo: Algorithm, tasks: list[ClientTask], received: Any
) -> list[ClientResult]:
    t0 = time.perf_counter()
    plan = tasks[0].plan
    model = runner.model(None)
    down = runner.tensors(received)
    names = [k for k, _ in model.named_parameters()]
    members = tasks if len(tasks) > 1 else tasks * 2  # a lone client is stacked with a copy
    k = len(members)
    device = runner.device
    data = []
    for t in members:
        idx = runner.dataset.client_indices[t.client_id]
        x = torch.from_numpy(runner.dataset.train.inputs(idx)).to(device)
        y = torch.from_numpy(runner.dataset.train.y[idx]).to(device)
        data.append((x, y, torch_rng(runner.experiment.seed, "shuffle", t.round, t.client_id)))
    stacked = {n: down[n].detach().unsqueeze(0).repeat(k, *[1] * down[n].dim()).clone() for n in names}
    for w in stacked.values():
        w.requires_grad_(True)
    opt = torch.optim.SGD(
        list(stacked.values()), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay
    )
    anchor = {n: down[n].detach() for n in names}

    def objective(params, x, y, w):
        ce = (F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none") * w).sum()
        extra = algo.stacked_penalty(params, anchor)
        return (ce if extra is None else ce + extra), ce

    per_client = vmap(objective)
    bs = run.batch_size
    shape = tuple(runner.dataset.input_shape)
    loss_sum, seen, steps = np.zeros(k), np.zeros(k), np.zeros(k, dtype=np.int64)
    model.train()
    for _ in range(plan.local_epochs):
        orders = [torch.randperm(x.shape[0], generator=g) for x, _, g in data]
        counts = [math.ceil(x.shape[0] / bs) for x, _, _ in data]
        for step in range(max(counts)):
            batches = [o[step * bs : (step + 1) * bs] for o in orders]
            width = bs  # always the full batch size, so no client's arithmetic depends on the others'
            xb = torch.zeros((k, width, *shape), dtype=data[0][0].dtype, device=device)
            yb = torch.zeros((k, width), dtype=torch.int64, device=device)
            wb = torch.zeros((k, width), dtype=xb.dtype, device=device)
            for i, ((x, y, _), b) in enumerate(zip(data, batches)):
                if len(b):
                    xb[i, : len(b)] = x[b]
                    yb[i, : len(b)] = y[b]
                    wb[i, : len(b)] = 1.0 / len(b)
            idle = [i for i, b in enumerate(batches) if not len(b)]
            opt.zero_grad(set_to_none=True)
            obj, ce = per_client(stacked, xb, yb, wb)
            obj.sum().backward()
            kept = _snapshot(opt, stacked, idle)
            opt.step()
            _restore(opt, stacked, idle, kept)
            for i, b in enumerate(batches):
                if len(b):
                    loss_sum[i] += float(ce[i].detach()) * len(b)
                    seen[i] += len(b)
                    steps[i] += 1
    seconds = (time.perf_counter() - t0) / len(tasks)
    forward = runner.forward_macs(None, model)
    order = list(model.state_dict())
    results = []
    for i, t in enumerate(tasks):
        upload = P.to_numpy({n: stacked[n].detach()[i] for n in order})
        n_i = int(data[i][0].shape[0])
        results.append(
            ClientResult(
                client_id=t.client_id,
                round=t.round,
                upload=upload,
                n_examples=n_i,
                train_loss=float(loss_sum[i] / max(seen[i], 1)),
                bytes_up=P.nbytes(upload),
                bytes_down=P.nbytes(received),
                seconds=seconds,
                worker=runner.worker_id,
                attempt=t.attempt,
                macs=int(n_i * plan.local_epochs * 3 * forward),
                trainable_params=sum(w.numel() for w in model.parameters()),
                local_steps=int(steps[i]),
            )
        )
    return results


def _snapshot(opt: torch.optim.Optimizer, stacked: dict[str, torch.Tensor], idle: list[int]):
    """The idle clients' slices of every stacked parameter and momentum buffer, before a step."""
    if not idle:
        return None
    rows = torch.tensor(idle)
    kept = []
    for w in stacked.values():
        buf = opt.state.get(w, {}).get("momentum_buffer")
        kept.append((w.detach()[rows].clone(), None if buf is None else buf[rows].clone()))
    return rows, kept


def _restore(opt: torch.optim.Optimizer, stacked: dict[str, torch.Tensor], idle: list[int], kept) -> None:
    """Put the idle clients' slices back as they were before the step: they took no step. A
    momentum buffer created by this step is zero for them (the per-client path starts a
    client's buffer at its first gradient, which equals 0 * momentum + gradient)."""
    if kept is None:
        return
    rows, saved = kept
    with torch.no_grad():
        for w, (before, buf_before) in zip(stacked.values(), saved):
            w[rows] = before
            buf = opt.state.get(w, {}).get("momentum_buffer")
            if buf is not None:
                buf[rows] = 0 if buf_before is None else buf_before
