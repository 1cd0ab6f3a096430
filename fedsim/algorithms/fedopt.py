"""Server optimisers: FedAvgM (Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019) and FedAdagrad, FedAdam, FedYogi (Reddi
et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

Clients train exactly as in FedAvg. The server treats the cohort's mean change as a pseudo-gradient:
with x the global weights, y_i client i's weights after local training and p_i = n_i / sum_S n,

    Delta = sum_{i in S} p_i (y_i - x)                  (the pseudo-gradient is -Delta)

per stepped tensor (:mod:`fedsim.algorithms.deltas`: floating point, not a BatchNorm buffer;
BatchNorm running statistics and integer counters are set to FedAvg's weighted mean, never
stepped). Algorithm 2 writes the unweighted mean (1/|S|) sum Delta_i; fedsim weights by examples
as FedAvg does, so FedAvgM with server_momentum 0 and server_lr 1 is FedAvg.

* FedAvgM: v = beta v + (-Delta); x = x - eta_s v. This is ``torch.optim.SGD(lr=eta_s,
  momentum=beta)`` (dampening 0, no Nesterov) stepping on grad = -Delta, and Flower's FedAvgM.
* Algorithm 2, the lines for m_t, v_t and x_{t+1} (m starts at 0, v at tau^2, no bias correction):

      m = beta1 m + (1 - beta1) Delta
      v = v + Delta^2                                    FedAdagrad
      v = beta2 v + (1 - beta2) Delta^2                  FedAdam
      v = v - (1 - beta2) Delta^2 sign(v - Delta^2)      FedYogi
      x = x + eta m / (sqrt(v) + tau)

  Differences from ``torch.optim``: Adam bias-corrects m and v (divides by 1 - beta^t) and starts
  v at 0; Adagrad has no first moment (beta1) and starts its sum at ``initial_accumulator_value``
  (0). Differences from Flower's strategies (flwr.server.strategy.FedAdam/FedYogi/FedAdagrad):
  they start v at 0, FedAdam multiplies eta by the bias correction sqrt(1 - beta2^(t+1)) /
  (1 - beta1^(t+1)), their tau defaults to 1e-9, and they step every array, BatchNorm statistics
  included. fedsim follows the paper's Algorithm 2.

Every tensor of the update is in the parameter's dtype (float32); Delta is accumulated in float64
and rounded once. The optimiser state (m, v, step count) is server state, kept in
``ServerState.algo_state`` (:class:`ServerOptState`), checkpointed and restored on resume with
the global model.

Under ``init: independent`` round 0's clients train their own initialisations, so there is no
common x to take a difference from: that round's aggregate is FedAvg's weighted mean (FedMA App.
A), the optimiser state stays empty, and the server optimiser steps from round 1 on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsim.algorithms.base import Algorithm, ClientResult, RoundPlan, ServerState
from fedsim.algorithms.deltas import averaged, combine, stepped
from fedsim.algorithms.registry import register
from fedsim.config import FedAdagradConfig, FedAdamConfig, FedAvgMConfig


@dataclass(frozen=True)
class ServerOptState:
    """The server optimiser's state between rounds (:attr:`ServerState.algo_state`).

    Attributes:
        step: server steps taken (rounds aggregated with the optimiser).
        m: stepped key -> first moment (FedAvgM: its momentum buffer), the parameter's shape and
            dtype; absent until the key's first step (then 0).
        v: stepped key -> second moment (adaptive variants only); absent until the first step
            (then tau^2).
    """

    step: int = 0
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)


def momentum_step(
    x: torch.Tensor, delta: torch.Tensor, m: torch.Tensor | None, lr: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Server SGD with momentum on the pseudo-gradient -Delta (FedAvgM, Hsu et al. 2019): buf =
    beta buf - Delta (buf = -Delta at the first step, as ``torch.optim.SGD``), x = x - lr buf.
    Returns (new x, new buf), each of ``x``'s shape and dtype."""
    buf = -delta if m is None else beta * m - delta
    return x - lr * buf, buf


SECOND_MOMENTS = {
    "adagrad": lambda v, d2, beta2: v + d2,
    "adam": lambda v, d2, beta2: beta2 * v + (1 - beta2) * d2,
    "yogi": lambda v, d2, beta2: v - (1 - beta2) * d2 * torch.sign(v - d2),
}
"""v_t from v_{t-1}, Delta^2 and beta2 for each adaptive rule (Reddi et al. 2021, Algorithm 2)."""


def adaptive_step(
    x: torch.Tensor,
    delta: torch.Tensor,
    m: torch.Tensor | None,
    v: torch.Tensor | None,
    rule: str,
    lr: float,
    beta1: float,
    beta2: float,
    epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of FedAdagrad, FedAdam or FedYogi (``rule``: adagrad, adam, yogi; Reddi et al.
    2021, Algorithm 2): m = beta1 m + (1 - beta1) Delta (m starts at 0), v from
    :data:`SECOND_MOMENTS` (v starts at epsilon^2), x = x + lr m / (sqrt(v) + epsilon). Returns
    (new x, m, v), each of ``x``'s shape and dtype."""
    m = (1 - beta1) * delta if m is None else beta1 * m + (1 - beta1) * delta
    v = SECOND_MOMENTS[rule](torch.full_like(x, epsilon**2) if v is None else v, delta * delta, beta2)
    return x + lr * m / (v.sqrt() + epsilon), m, v


class ServerOptimizer(Algorithm):
    """FedAvg's clients and a server optimiser on the pseudo-gradient; subclasses define
    :meth:`update` for one tensor."""

    full_network = True  # the server optimiser changes the server's arithmetic, not the traffic
    vectorizable = True
    AlgoState = ServerOptState

    def update(
        self, x: torch.Tensor, delta: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One server step of one tensor: (new x, new m, new v or None).

        Args:
            x: the global tensor; delta: Delta for it (same shape and dtype); m, v: the state
                from the previous step, None at the first.
        """
        raise NotImplementedError

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        """Stepped tensors: one server step on Delta; the other uploaded tensors: FedAvg's mean."""
        if plan.own_init:  # independently trained models: FedAvg's mean, no step (module docstring)
            return super().aggregate(state, plan, results)
        uploads, n = [r.upload for r in results], [r.n_examples for r in results]
        keys = [k for k in uploads[0] if stepped(k, state.params[k])]
        total = float(sum(n))
        delta = combine(uploads, [w / total for w in n], keys, origin=state.params)
        opt = state.algo_state or ServerOptState()
        m, v, new = dict(opt.m), dict(opt.v), {}
        for k in keys:
            new[k], m[k], vk = self.update(state.params[k], delta[k], opt.m.get(k), opt.v.get(k))
            if vk is not None:
                v[k] = vk
        mean = averaged(uploads, n, [k for k in uploads[0] if k not in new])
        return ServerState(
            params={**state.params, **mean, **new}, algo_state=ServerOptState(int(opt.step) + 1, m, v)
        )


@register
class FedAvgM(ServerOptimizer):
    """Server momentum: v = beta v - Delta; x = x - eta_s v (Hsu et al. 2019, section 3)."""

    name = "fedavgm"
    Config = FedAvgMConfig

    def update(self, x, delta, m, v):
        new, buf = momentum_step(x, delta, m, self.cfg.server_lr, self.cfg.server_momentum)
        return new, buf, None


class _Adaptive(ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2: m, then v (the class's ``rule`` of :data:`SECOND_MOMENTS`), then x."""

    rule = ""

    def update(self, x, delta, m, v):
        c = self.cfg
        return adaptive_step(
            x, delta, m, v, self.rule, c.server_lr, c.beta1, getattr(c, "beta2", 0.0), c.epsilon
        )


@register
class FedAdagrad(_Adaptive):
    """v = v + Delta^2."""

    name = "fedadagrad"
    Config = FedAdagradConfig
    rule = "adagrad"


@register
class FedAdam(_Adaptive):
    """v = beta2 v + (1 - beta2) Delta^2."""

    name = "fedadam"
    Config = FedAdamConfig
    rule = "adam"


@register
class FedYogi(_Adaptive):
    """v = v - (1 - beta2) Delta^2 sign(v - Delta^2)."""

    name = "fedyogi"
    Config = FedAdamConfig
    rule = "yogi"
