"""Algorithms whose clients train another algorithm's local objective: FedPart (the objective
restricted to the active layer group) and the asynchronous FedBuff and FedAsync. The client side
(weights, local update, stacked hooks, client state, frozen passes) is the ``inner`` algorithm's;
the subclass owns the server side."""

from __future__ import annotations

from typing import Any

from fedsim.algorithms.base import Algorithm, ClientContext, ClientState
from fedsim.algorithms.fedavg import FedAvg
from fedsim.algorithms.fedprox import FedProx
from fedsim.algorithms.moon import MOON
from fedsim.config import ExperimentConfig, RunConfig

OBJECTIVES: dict[str, type[Algorithm]] = {"fedavg": FedAvg, "fedprox": FedProx, "moon": MOON}
"""Local objectives by name: cross-entropy, plus FedProx's proximal or MOON's contrastive term."""

DEFAULT_MU = {"fedavg": 0.0, "fedprox": 0.001, "moon": 5.0}
"""The objective's coefficient when the run leaves ``mu`` null: FedProx's 0.001 (FedMA's
baselines), MOON's 5 (its CIFAR-10 setting)."""


class WithLocalObjective(Algorithm):
    """An algorithm whose clients train the local objective named by its config's
    ``local_objective`` with coefficient :meth:`objective_mu` (``self.inner``)."""

    def __init__(
        self,
        cfg: RunConfig,
        experiment: ExperimentConfig,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__(cfg, experiment, num_classes, input_shape)
        self.inner: Algorithm = OBJECTIVES[cfg.local_objective](
            cfg.model_copy(update={"mu": self.objective_mu()}), experiment, num_classes, input_shape
        )

    def objective_mu(self) -> float:
        """The inner objective's ``mu``: the run's, or :data:`DEFAULT_MU` of the objective."""
        mu = getattr(self.cfg, "mu", None)
        return mu if mu is not None else DEFAULT_MU[self.cfg.local_objective]

    @property
    def stateful(self) -> bool:
        return self.inner.stateful

    def client_state_type(self) -> type[ClientState]:
        return self.inner.client_state_type()

    @property
    def frozen_forwards(self) -> int:  # type: ignore[override]
        return self.inner.frozen_forwards

    def client_weights(self, task, received, state, init):
        return self.inner.client_weights(task, received, state, init)

    def local_update(self, ctx: ClientContext):
        return self.inner.local_update(ctx)

    @property
    def vectorizable(self) -> bool:  # type: ignore[override]
        """The local objective's."""
        return self.inner.vectorizable

    def stacked_begin(self, sctx, states):
        return self.inner.stacked_begin(sctx, states)

    def stacked_loss(self, sctx, tensors, x, y, w, aux):
        return self.inner.stacked_loss(sctx, tensors, x, y, w, aux)

    def stacked_finish(self, sctx, task, state, final, steps) -> Any:
        return self.inner.stacked_finish(sctx, task, state, final, steps)
