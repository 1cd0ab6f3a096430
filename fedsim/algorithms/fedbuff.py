"""FedBuff, buffered asynchronous aggregation (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek,
Huba, "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022, Algorithm 1).

``concurrency`` (C) clients train at all times. A client downloads the current model x_tau,
trains the local objective (FedAvg's, FedProx's or MOON's) and returns y; its update is
Delta = y - x_tau. The server adds s(tau) x w x Delta to a buffer (s: the staleness weight,
1 / sqrt(1 + tau) by default; w: 1, or the client's examples with ``weighting: examples``) and,
after K = ``buffer_size`` updates, divides the buffer by K (by the sum of the updates' example
counts under ``weighting: examples``) and takes one server optimiser step on it: SGD
x <- x - eta (beta buf - Delta_bar) (``server_lr`` eta, ``server_momentum`` beta; eta 1, beta 0:
x + Delta_bar, the paper's line 12 with eta_g = 1), or FedAdam, FedYogi or FedAdagrad's step
(Reddi et al. 2021, Algorithm 2; :mod:`fedsim.algorithms.fedopt`). BatchNorm running statistics and
integer counters are not stepped: they become the example-weighted mean of the buffered uploads.

How it differs elsewhere: FLSim's ``HybridAggregator`` (flsim/optimizers/async_aggregators.py,
``_collect_client_update`` and ``_update_global_model``) reduces the buffered deltas as a weighted
sum (``ReductionType.WEIGHTED_SUM``) and steps a torch optimiser on it, so its server learning rate
absorbs the paper's 1/K. FedScale's asynchronous aggregator
(fedscale/cloud/aggregation/async_aggregator.py, ``update_weight_aggregation``) averages the
clients' model weights with weights 1 / (1 + staleness), normalised by their sum, and sets the
global model to that average: no buffered delta and no server learning rate. fedsim follows the
paper: the buffer holds s(tau) Delta and is divided by K.

With C = K = the cohort, identical devices (every update of a step has staleness 0), ``staleness:
constant`` and server SGD with lr 1, a server step is x + (1/K) sum (y_k - x) = the mean of the y_k:
synchronous FedAvg with equal client weights (a test holds it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedsim import params as P
from fedsim.algorithms.asynchronous import AsyncAlgorithm
from fedsim.algorithms.base import ClientResult, ServerState
from fedsim.algorithms.deltas import stepped
from fedsim.algorithms.fedopt import adaptive_step, momentum_step
from fedsim.algorithms.registry import register
from fedsim.config import FedBuffConfig


@dataclass(frozen=True)
class FedBuffState:
    """The server's state between arrivals (:attr:`ServerState.algo_state`).

    Attributes:
        step: server steps taken; m, v: the server optimiser's moments by stepped key (shapes and
            dtypes of the parameter; absent before the key's first step).
        buffer: stepped key -> float64 sum of s(tau) w Delta over the buffered updates.
        stats: other uploaded key -> float64 sum of n x value (BatchNorm statistics, counters).
        count: updates in the buffer; weight: the sum of their w; examples: the sum of their n.
    """

    step: int = 0
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    buffer: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    weight: float = 0.0
    examples: int = 0


def _f64(x) -> torch.Tensor:
    """A float64 CPU copy of a tensor or numpy array (uploads from Ray's object store are read-only)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64)
    return torch.from_numpy(np.array(x, dtype=np.float64))


@register
class FedBuff(AsyncAlgorithm):
    """Buffered asynchronous aggregation with a server optimiser (module docstring)."""

    name = "fedbuff"
    Config = FedBuffConfig
    AlgoState = FedBuffState
    quick = {"rounds": 3, "concurrency": 2, "buffer_size": 2}

    def updates_per_step(self) -> int:
        return self.cfg.buffer_size

    def init_state(self, params: P.Params) -> ServerState:
        return ServerState(params=P.clone(params), algo_state=FedBuffState())

    def arrive(
        self, state: ServerState, result: ClientResult, base: P.Params, staleness: int
    ) -> tuple[ServerState, bool]:
        """Buffer s(tau) w (y - x_tau); at K updates, one server step on the buffer's mean."""
        st: FedBuffState = state.algo_state
        w = float(result.n_examples) if self.cfg.weighting == "examples" else 1.0
        scale = self.s(staleness) * w
        buffer, stats = dict(st.buffer), dict(st.stats)
        for k, y in result.upload.items():
            if stepped(k, y):
                d = (_f64(y) - _f64(base[k])) * scale
                buffer[k] = d if k not in buffer else buffer[k] + d
            else:
                s = _f64(y) * float(result.n_examples)
                stats[k] = s if k not in stats else stats[k] + s
        st = FedBuffState(
            st.step, st.m, st.v, buffer, stats, st.count + 1, st.weight + w, st.examples + result.n_examples
        )
        if st.count < self.cfg.buffer_size:
            return ServerState(state.params, st), False
        return self._step(state.params, st), True

    def _step(self, params: P.Params, st: FedBuffState) -> ServerState:
        c = self.cfg
        denom = st.weight if c.weighting == "examples" else float(st.count)
        m, v, new = dict(st.m), dict(st.v), {}
        for k, acc in st.buffer.items():
            x = params[k]
            delta = (acc / denom).to(x.dtype)
            if c.server_optimizer == "sgd":
                new[k], m[k] = momentum_step(x, delta, st.m.get(k), c.server_lr, c.server_momentum)
            else:
                new[k], m[k], v[k] = adaptive_step(
                    x,
                    delta,
                    st.m.get(k),
                    st.v.get(k),
                    c.server_optimizer,
                    c.server_lr,
                    c.beta1,
                    c.beta2,
                    c.epsilon,
                )
        for k, acc in st.stats.items():
            new[k] = (acc / float(st.examples)).to(params[k].dtype)
        return ServerState({**params, **new}, FedBuffState(st.step + 1, m, v))
