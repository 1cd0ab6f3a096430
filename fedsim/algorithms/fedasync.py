"""FedAsync (Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019, Algorithm 1).

Every arriving update is a server step: x <- (1 - alpha_t) x + alpha_t x_new, with alpha_t =
``alpha`` x s(t - tau) (s: the staleness weight, :func:`fedsim.algorithms.asynchronous.staleness_weight`;
t - tau the server steps since the client's download). The clients minimise the paper's local
objective f(x_new) + (``rho`` / 2) ||x_new - x_tau||^2, FedProx's proximal term around the
downloaded model (``local_objective: fedprox``, its default; FedAvg's or MOON's objective on
request). BatchNorm running statistics are mixed like the weights; integer counters take the
client's value.

With alpha = 1 and one client in flight, x <- x_new: the run trains its clients one after another,
sequential SGD over clients (a test holds it against synchronous FedAvg with one client a round).
"""

from __future__ import annotations

from fedsim import params as P
from fedsim.algorithms.asynchronous import AsyncAlgorithm
from fedsim.algorithms.base import ClientResult, ServerState
from fedsim.algorithms.registry import register
from fedsim.config import FedAsyncConfig


@register
class FedAsync(AsyncAlgorithm):
    """Staleness-weighted mixing of every arriving model (module docstring)."""

    name = "fedasync"
    Config = FedAsyncConfig

    def objective_mu(self) -> float:
        """rho for the proximal objective; MOON's or nothing otherwise."""
        if self.cfg.local_objective == "fedprox":
            return self.cfg.rho
        return super().objective_mu()

    def arrive(
        self, state: ServerState, result: ClientResult, base: P.Params, staleness: int
    ) -> tuple[ServerState, bool]:
        """x <- (1 - alpha_t) x + alpha_t x_new on every floating tensor (integers: x_new's)."""
        a = self.cfg.alpha * self.s(staleness)
        new = {}
        for k, y in P.from_numpy(result.upload).items():
            x = state.params[k]
            if x.is_floating_point():
                new[k] = y.to(x.dtype) if a == 1.0 else ((1 - a) * x.double() + a * y.double()).to(x.dtype)
            else:
                new[k] = y.to(x.dtype)
        return ServerState({**state.params, **new}, state.algo_state), True
