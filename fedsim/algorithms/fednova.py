"""FedNova (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020): FedAvg's clients, normalised averaging.

Client i takes tau_i local SGD steps (one per minibatch: ``ClientResult.local_steps``, reported
with the upload as ``n_examples`` is; neither is counted in the bytes). Its local update is
x - y_i = eta sum_k a_{i,k} g_{i,k}, with ||a_i||_1 (the paper's examples of a_i in its general
update rule, section 3: vanilla SGD and SGD with momentum):

    ||a_i||_1 = tau_i                                             plain SGD
    ||a_i||_1 = sum_{k=1}^{tau_i} (1 - rho^k) / (1 - rho)         SGD with momentum rho
              = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)

(torch's SGD buffer starts at the first gradient, v = rho v + g, so the gradient of step k
moves the weights by eta (1 - rho^(tau_i - k + 1)) / (1 - rho) by the end). The server, with
p_i = n_i / sum_S n over the kept clients S (FedNova's update rule, section 4):

    d_i = (x - y_i) / ||a_i||_1              the normalised update
    tau_eff = sum_S p_i ||a_i||_1
    x = x - tau_eff sum_S p_i d_i  =  x + sum_S (p_i tau_eff / ||a_i||_1) (y_i - x)

When every client takes the same number of steps this is FedAvg's weighted mean. Stepped tensors
only (:mod:`fedsim.algorithms.deltas`); BatchNorm running statistics and integer counters take
FedAvg's weighted mean. A client with no step (no examples, p_i = 0) contributes nothing. Under
``init: independent`` round 0's aggregate is FedAvg's mean of the independently trained models
(FedMA App. A). Local training must be SGD (``optimizer: adam`` is rejected by the config).
"""

from __future__ import annotations

from fedsim.algorithms.base import Algorithm, ClientResult, RoundPlan, ServerState
from fedsim.algorithms.deltas import averaged, combine, stepped
from fedsim.algorithms.registry import register
from fedsim.config import FedNovaConfig


def a_norm(steps: int, momentum: float) -> float:
    """||a_i||_1 of ``steps`` local SGD steps with momentum rho = ``momentum`` in [0, 1)
    (FedNova, section 3's examples of a_i): ``steps`` without momentum, else sum_{k=1}^{steps} (1 - rho^k) / (1 - rho).
    A float >= 0, in units of local steps."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


@register
class FedNova(Algorithm):
    """FedAvg with FedNova's normalised averaging of the clients' updates."""

    name = "fednova"
    full_network = True  # the normalisation changes the server's arithmetic, not the traffic
    vectorizable = True
    Config = FedNovaConfig

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        if plan.own_init:
            return super().aggregate(state, plan, results)
        uploads, n = [r.upload for r in results], [r.n_examples for r in results]
        p = [w / float(sum(n)) for w in n]
        a = [a_norm(r.local_steps, plan.momentum) for r in results]
        tau_eff = sum(pi * ai for pi, ai in zip(p, a))
        coefs = [pi * tau_eff / ai if ai > 0 else 0.0 for pi, ai in zip(p, a)]
        keys = [k for k in uploads[0] if stepped(k, state.params[k])]
        delta = combine(uploads, coefs, keys, origin=state.params)
        mean = averaged(uploads, n, [k for k in uploads[0] if k not in delta])
        return ServerState(
            params={**state.params, **mean, **{k: state.params[k] + delta[k] for k in keys}},
            algo_state=state.algo_state,
        )
