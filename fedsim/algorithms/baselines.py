"""The FedMA paper's non-federated reference points (Wang et al., ICLR 2020, section 3 and
Figure 1; docs/algorithms.md section 4), runnable from the same experiment file as the algorithms:

* ``ensemble``: every client trains its own model from its own initialisation, uploads it once,
  and the prediction is the uniform average of the J local models' softmax outputs;
* ``local``: the same local models, each evaluated on its own; the reported accuracy and loss
  are their means over the J clients (Figure 1's "local models");
* ``entire_data``: one model trained on the union of all clients' data (no communication).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedsim import params as P
from fedsim.algorithms.base import (
    Algorithm,
    ClientResult,
    ClientTask,
    RoundPlan,
    ServerState,
    Traffic,
    WireFacts,
)
from fedsim.algorithms.registry import register
from fedsim.config import OneShotConfig, PooledConfig


@dataclass
class EnsembleState:
    """The ensemble's server state: ``members``, the cohort's locally trained models (state_dict
    key -> tensor each), in cohort order."""

    members: list[P.Params]


@register
class Ensemble(Algorithm):
    """Uniform average of the cohort's local models' softmax outputs (FedMA paper, Figure 1)."""

    name = "ensemble"
    AlgoState = EnsembleState
    quick = {}
    Config = OneShotConfig

    def num_rounds(self) -> int:
        return 1

    def plan_round(self, state: ServerState, round: int, cohort: tuple[int, ...]) -> RoundPlan:
        c = self.cfg
        return RoundPlan(
            round=round,
            cohort=cohort,
            local_epochs=c.local_epochs,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            phase="one-shot",
        )

    def downlink(self, state: ServerState, plan: RoundPlan) -> P.Params:
        return {}

    def traffic(self, rp: Any, wire: WireFacts) -> Traffic:
        """One round: each cohort client uploads its whole locally trained model, nothing goes
        down, and the evaluated model is the k members (k x the model's parameters)."""
        k = wire.clients_per_round
        return Traffic("one-shot", rp.bytes_up, 0, k, k * wire.params)

    def client_weights(self, task: ClientTask, received: P.Params, state: Any, init):
        return None, self.own_init(task, init)

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        members = [P.from_numpy(r.upload) for r in results]
        return ServerState(params=members[0], algo_state=EnsembleState(members))

    def evaluate(self, state: ServerState, model, split, batch_size: int) -> tuple[float, float]:
        from fedsim.evaluation import evaluate_probs

        members = state.algo_state.members
        model.eval()

        def predict(x: torch.Tensor) -> torch.Tensor:
            probs = 0
            for m in members:
                model.load_state_dict(m)
                probs = probs + torch.softmax(model(x), 1)
            return probs / len(members)

        return evaluate_probs(predict, split, batch_size)

    def global_size(self, state: ServerState, model) -> int:
        members = state.algo_state.members if state.algo_state is not None else [None]
        return len(members) * sum(w.numel() for w in model.parameters())


@register
class LocalModels(Ensemble):
    """The clients' own models, each trained from its own initialisation and never aggregated
    (FedMA paper, Figure 1, "local models"). Bytes are the ensemble's: each model is uploaded once
    so that the server can evaluate it. The reported test accuracy is the mean over the J models
    of each model's accuracy on the global test set (unweighted), the loss likewise."""

    name = "local"

    def evaluate(self, state: ServerState, model, split, batch_size: int) -> tuple[float, float]:
        from fedsim.evaluation import evaluate

        scores = []
        for member in state.algo_state.members:
            model.load_state_dict(member)
            scores.append(evaluate(model, split, batch_size))
        return (sum(a for a, _ in scores) / len(scores), sum(l for _, l in scores) / len(scores))


@register
class EntireData(Algorithm):
    """One model trained on all clients' data pooled: ``rounds`` x ``local_epochs`` epochs.

    Each round is one task over the union of every client's examples, logged in clients.parquet
    as client 0 with ``n_examples`` the pooled count and 0 bytes.
    """

    def traffic(self, rp: Any, wire: WireFacts) -> Traffic:
        """Pooled training: no bytes, one task whose compute counts every client's examples."""
        return Traffic("pooled", 0, 0, 1, wire.params, pooled=True)

    name = "entire_data"
    Config = PooledConfig

    def plan_round(self, state: ServerState, round: int, cohort: tuple[int, ...]) -> RoundPlan:
        c = self.cfg
        return RoundPlan(
            round=round,
            cohort=(0,),
            local_epochs=c.local_epochs,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            phase="pooled",
            pooled=True,
        )

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        return ServerState(params={**state.params, **P.from_numpy(results[0].upload)})
