"""What the asynchronous algorithms (FedBuff, FedAsync) share: the staleness functions and the
server-side hook the engine's event loop calls for every arriving update.

An asynchronous run has no rounds: ``concurrency`` clients train at all times on the virtual clock
(docs/heterogeneity.md), each from the model version it downloaded, and the server consumes their
updates in arrival order (:mod:`fedsim.engine.loop`). A client's staleness tau is the number of
server steps taken between its download and the arrival of its update. The algorithm decides, for
each arriving update, how it changes the server state and whether that is a server step
(:meth:`AsyncAlgorithm.arrive`); each server step is a row of rounds.parquet.
"""

from __future__ import annotations

from typing import ClassVar

from fedsim import params as P
from fedsim.algorithms.base import ClientResult, ServerState
from fedsim.algorithms.objective import WithLocalObjective


def staleness_weight(kind: str, tau: int, a: float, b: float) -> float:
    """s(tau), the weight of an update of staleness ``tau`` (server steps), Xie, Koyejo, Gupta,
    "Asynchronous Federated Optimization" (2019), section 5.2:

    * ``constant``: 1;
    * ``polynomial``: (tau + 1)^-a (FedBuff's 1 / sqrt(1 + tau) is a = 0.5; Nguyen et al.,
      AISTATS 2022, section 3);
    * ``hinge``: 1 if tau <= b, else 1 / (a (tau - b) + 1).

    Raises:
        ValueError: an unknown ``kind`` or a negative ``tau``.
    """
    if tau < 0:
        raise ValueError(f"staleness must be >= 0 (got {tau})")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((tau + 1) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; use constant, polynomial or hinge")


class AsyncAlgorithm(WithLocalObjective):
    """An asynchronous algorithm: its clients train the local objective of FedAvg, FedProx or MOON
    from the version they downloaded; :meth:`arrive` folds each arriving update into the server
    state. ``rounds`` counts server steps."""

    asynchronous: ClassVar[bool] = True
    not_projectable = (
        "asynchronous: the dry run does not replay the event order (the engine derives it from the "
        "clock alone while it runs)"
    )
    quick = {"rounds": 3, "concurrency": 2}

    def updates_per_step(self) -> int:
        """Consumed updates per server step (FedAsync: 1; FedBuff: K): the event simulation counts
        steps with it before any update is trained (:mod:`fedsim.engine.asynchronous`), and
        :meth:`arrive` must step exactly then."""
        return 1

    def s(self, tau: int) -> float:
        """The run's staleness weight of ``tau`` (:func:`staleness_weight`)."""
        c = self.cfg
        return staleness_weight(c.staleness, tau, c.staleness_a, c.staleness_b)

    def arrive(
        self, state: ServerState, result: ClientResult, base: P.Params, staleness: int
    ) -> tuple[ServerState, bool]:
        """Fold one arriving update into the server state.

        Args:
            state: the server state now (its ``params`` are the current global model).
            result: the client's update (``upload``: name -> numpy array; ``n_examples``).
            base: the global model the client downloaded (name -> tensor), version
                ``current - staleness``.
            staleness: tau, server steps since its download (>= 0).

        Returns:
            (the new server state, whether this arrival completed a server step).
        """
        raise NotImplementedError
