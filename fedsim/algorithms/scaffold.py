"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020, Algorithm 1 with option II control variates).

State: the server's control variate c (:class:`ScaffoldState`, the run's
``ServerState.algo_state``, checkpointed with the global model) and each client's c_i
(:class:`ScaffoldClientState` in the engine's store, 0 at a client's first participation;
checkpointed with the store). Both hold one
tensor per stepped key (:mod:`fedsim.algorithms.deltas`: for fedsim's models the parameters),
with the parameter's shape and dtype (float32).

Client i (Algorithm 1, the client lines), from y = x:

    y = y - eta_l (g_i(y) - c_i + c)            K times, one per minibatch (c - c_i is added to
                                                each parameter's gradient before the SGD step)
    c_i+ = c_i - c + (x - y) / (K eta_l)        option II, K the steps actually taken
    upload y and Delta c_i = c_i+ - c_i         (y instead of Delta y = y - x: the same bytes)

Server (Algorithm 1, the server lines), over the kept clients S of N = data.num_clients:

    x = x + eta_g (1/|S|) sum_S (y_i - x)       the unweighted mean of the paper, not FedAvg's
    c = c + (|S| / N) (1/|S|) sum_S Delta c_i     example weights; eta_g = ``server_lr``

BatchNorm running statistics and integer counters are set to FedAvg's example-weighted mean.

Bytes: the broadcast is the global state_dict plus c, the upload FedAvg's plus Delta c: for a
model without BatchNorm buffers exactly twice FedAvg's bytes each way (buffers have no control
variate). Under ``init: independent`` round 0 sends nothing down, clients train their own
initialisations with plain SGD and upload only y (FedAvg's bytes), the aggregate is FedAvg's
weighted mean (FedMA App. A) and every control variate stays 0.

Local optimiser: plain SGD is the paper's setting (``optimizer: adam`` is rejected). With
``momentum`` the corrected gradient g - c_i + c is what the momentum buffer accumulates, and
option II's (x - y) / (K eta_l) then measures the momentum-amplified mean step (about 1 / (1 -
momentum) times larger), so the control variates are scaled accordingly: not the paper's
setting. ``weight_decay`` is added by the optimiser after the correction, and c_i+ absorbs it
through x - y. A parameter that gets no gradient in a batch (``.grad`` None) gets no correction.

Stacked (vectorised) clients (:mod:`fedsim.engine.vectorize`): the correction enters as the linear
term sum_k <c - c_i, y_k> added to each client's loss, whose gradient is exactly c - c_i, so the
stacked update equals the per-client one up to float rounding. A trainable parameter always gets
its correction there, since every trainable tensor of a client is in its loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from fedsim import params as P
from fedsim.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    ClientState,
    RoundPlan,
    ServerState,
    StackedContext,
    Traffic,
    WireFacts,
)
from fedsim.algorithms.deltas import averaged, combine, stepped_keys
from fedsim.algorithms.registry import register
from fedsim.config import ScaffoldConfig

#: Prefix of c's tensors in the broadcast and of Delta c_i's in an upload (never a state_dict key).
C_PREFIX = "scaffold.c:"
DC_PREFIX = "scaffold.dc:"


@dataclass
class ScaffoldState:
    """The server's control variate ``c``: stepped key -> tensor (the parameter's shape, dtype)."""

    c: P.Params


@dataclass
class ScaffoldClientState(ClientState):
    """A client's stored control variate ``c`` (c_i): stepped key -> array; None before its first
    participation (then 0)."""

    c: dict[str, Any] | None = None


def _server_c(received: P.Params) -> P.Params:
    """c from the broadcast: stepped key -> tensor."""
    return {k[len(C_PREFIX) :]: v for k, v in received.items() if k.startswith(C_PREFIX)}


def _client_c(state: ScaffoldClientState | None, c: P.Params) -> P.Params:
    """The client's stored c_i as tensors on c's device; zeros before its first participation."""
    stored = state.c if state is not None else None
    if stored is None:
        return {k: torch.zeros_like(v) for k, v in c.items()}
    return {k: v.to(c[k].device) for k, v in P.from_numpy(stored).items()}


def _next_c(c: P.Params, c_i: P.Params, x: P.Params, y: P.Params, steps: int, lr: float) -> P.Params:
    """c_i+ = c_i - c + (x - y) / (K * lr), Algorithm 1 option II (K = ``steps`` local steps);
    c_i unchanged when no step was taken (no examples: nothing learnt about the client's drift)."""
    if not steps:
        return c_i
    return {k: c_i[k] - c[k] + (x[k] - y[k].detach()) / (steps * lr) for k in c}


@register
class Scaffold(Algorithm):
    """SCAFFOLD: local SGD corrected by control variates; clients keep c_i in the engine's store."""

    name = "scaffold"
    Config = ScaffoldConfig
    keeps_client_state = True
    AlgoState = ScaffoldState
    ClientStateType = ScaffoldClientState
    vectorizable = True

    def traffic(self, rp: Any, wire: WireFacts) -> Traffic:
        """FedAvg's traffic plus c down to and Delta c_i up from every cohort client (one tensor
        of the stepped tensors' shapes and dtypes each way), except in an ``own_init`` round."""
        base = super().traffic(rp, wire)
        if self.starts_from_own_init(rp.round):
            return base
        c = P.subset(wire.state, stepped_keys(wire.state))
        k = wire.clients_per_round
        return replace(
            base,
            bytes_up=base.bytes_up + k * wire.upload_bytes(c),
            bytes_down=base.bytes_down + k * wire.download_bytes(c),
        )

    # ---- server side
    def init_state(self, params: P.Params) -> ServerState:
        """x0 and c = 0 over the stepped keys."""
        state = super().init_state(params)
        c = {k: torch.zeros_like(params[k]) for k in stepped_keys(params)}
        return ServerState(params=state.params, algo_state=ScaffoldState(c))

    def upload_tensors(self, state: ServerState, plan: RoundPlan) -> P.Params:
        """FedAvg's upload plus Delta c_i (one tensor per key of c), except in an ``own_init`` round."""
        base = super().upload_tensors(state, plan)
        if plan.own_init:
            return base
        return {**base, **{DC_PREFIX + k: v for k, v in state.algo_state.c.items()}}

    def downlink(self, state: ServerState, plan: RoundPlan) -> P.Params:
        """The global state_dict and c (nothing in an ``own_init`` round)."""
        down = super().downlink(state, plan)
        if plan.own_init:
            return down
        return {**down, **{C_PREFIX + k: v for k, v in state.algo_state.c.items()}}

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        if plan.own_init:  # uploads hold only y; c stays 0
            return super().aggregate(state, plan, results)
        c = state.algo_state.c
        ys = [{k: v for k, v in r.upload.items() if not k.startswith(DC_PREFIX)} for r in results]
        dcs = [{k: r.upload[DC_PREFIX + k] for k in c} for r in results]
        s, n = len(results), self.experiment.data.num_clients
        dy = combine(ys, [1.0 / s] * s, list(c), origin=state.params)  # (1/|S|) sum (y_i - x)
        x = {k: state.params[k] + self.cfg.server_lr * dy[k] for k in c}
        dc = combine(dcs, [1.0 / n] * s, list(c))  # (|S|/N) mean Delta c_i
        mean = averaged(ys, [r.n_examples for r in results], [k for k in ys[0] if k not in c])
        return ServerState(
            params={**state.params, **mean, **x}, algo_state=ScaffoldState({k: c[k] + dc[k] for k in c})
        )

    # ---- client side
    def local_update(self, ctx: ClientContext) -> tuple[P.Params, float]:
        """Corrected local SGD; returns (y plus Delta c_i, mean CE) and sets c_i+ as the client's
        state. In an ``own_init`` round (nothing received): plain SGD, y only, c_i unchanged."""
        if ctx.plan.own_init:
            return super().local_update(ctx)
        c = _server_c(ctx.received)
        c_i = _client_c(ctx.state, c)
        x = {k: ctx.received[k] for k in c}
        ctx.aux["correction"] = [
            (w, c[k] - c_i[k]) for k, w in ctx.model.named_parameters() if k in c and w.requires_grad
        ]
        upload, loss = super().local_update(ctx)
        c_new = _next_c(c, c_i, x, ctx.model.state_dict(), ctx.local_steps, ctx.plan.lr)
        self.new_client_state(ctx).c = P.to_numpy(c_new)
        return {**upload, **{DC_PREFIX + k: c_new[k] - c_i[k] for k in c}}, loss

    def stacked_begin(self, sctx: StackedContext, states: list[Any]) -> dict[str, torch.Tensor]:
        """c - c_i for every stacked client and trainable stepped key, ``(K, *shape)`` each (an
        ``own_init`` round is never stacked)."""
        c = _server_c(sctx.received)
        keys = [k for k in c if k in set(sctx.trainable)]
        rows = [_client_c(s, c) for s in states]
        return {C_PREFIX + k: torch.stack([c[k] - c_i[k] for c_i in rows]) for k in keys}

    def stacked_loss(self, sctx, tensors, x, y, w, aux):
        """The weighted cross-entropy plus sum_k <c - c_i, w_k>: a linear term whose gradient is the
        correction c - c_i that :meth:`before_step` adds on the per-client path."""
        objective, ce = super().stacked_loss(sctx, tensors, x, y, w, aux)
        for key, correction in aux.items():
            objective = objective + (correction * tensors[key[len(C_PREFIX) :]]).sum()
        return objective, ce

    def stacked_finish(self, sctx, task, state, final, steps):
        """y plus Delta c_i, and c_i+ (option II of Algorithm 1) as the client's new state."""
        upload, new_state, frozen = super().stacked_finish(sctx, task, state, final, steps)
        c = _server_c(sctx.received)
        c_i = _client_c(state, c)
        c_new = _next_c(c, c_i, {k: sctx.received[k] for k in c}, final, steps, task.plan.lr)
        new_state = new_state or self.client_state_type()()
        new_state.c = P.to_numpy(c_new)
        return {**upload, **{DC_PREFIX + k: c_new[k] - c_i[k] for k in c}}, new_state, frozen

    def before_step(self, ctx: ClientContext) -> None:
        """grad += c - c_i for every trainable parameter (Algorithm 1's corrected local step)."""
        for w, correction in ctx.aux.get("correction", ()):
            if w.grad is not None:
                w.grad.add_(correction)
