"""FedPart, partial network updates (Wang et al., "Why Go Full? Elevating Federated Learning
Through Partial Network Updates", NeurIPS 2024), docs/algorithms.md section 5.

One cycle is ``warmup_rounds`` (W) full-network rounds, then a sweep over the model's layer groups
(shallow to deep, reversed, or a fresh random permutation per cycle) with ``rounds_per_group`` (R)
rounds each; ``cycles`` (C) cycles make C * (W + R * G) rounds. In a partial round clients freeze
every tensor outside the active group, train it, and upload only it; the server replaces only that
group by the example-weighted mean. The optimiser is recreated each round over the trainable
tensors (the paper: Adam, lr 1e-3). The local objective is FedAvg's, FedProx's or MOON's,
unchanged except that only the active group trains. The schedule is the one
:func:`fedsim.accounting.fedpart_schedule` lays out, so dry-run projections and runs agree.

Under ``init: independent`` round 0 (a full-network warm-up round; the config requires
``warmup_rounds >= 1``) starts every client from its own initialisation and sends nothing down,
as for FedAvg (FedMA App. A; IBM/FedMA main.py): the base plan carries ``own_init``, the base
downlink is then empty, and the local objective's client side trains the client's own init.
"""

from __future__ import annotations

from typing import Any

from fedsim.accounting import FedPartSchedule, fedpart_schedule
from fedsim.algorithms.base import RoundPlan, ServerState
from fedsim.algorithms.objective import WithLocalObjective
from fedsim.algorithms.registry import register
from fedsim.config import ExperimentConfig, FedPartConfig, RunConfig
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng


@register
class FedPart(WithLocalObjective):
    """Partial network updates over the model's layer groups, with a pluggable local objective."""

    name = "fedpart"
    quick = {"warmup_rounds": 1, "rounds_per_group": 1, "cycles": 1}
    Config = FedPartConfig

    def __init__(
        self,
        cfg: RunConfig,
        experiment: ExperimentConfig,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__(cfg, experiment, num_classes, input_shape)
        self.groups = self.reference_model().layer_groups() if num_classes is not None else []
        if num_classes is not None:
            rng = numpy_rng(experiment.seed, "schedule")
            spec = FedPartSchedule(cfg.warmup_rounds, cfg.rounds_per_group, cfg.cycles, cfg.order)
            self.schedule = fedpart_schedule(len(self.groups), spec, rng)
            self.param_names = {k for k, _ in self.reference_model().named_parameters()}

    def num_rounds(self) -> int:
        return len(self.schedule)

    def cycle_length(self) -> int | None:
        return self.cfg.warmup_rounds + self.cfg.rounds_per_group * len(self.groups)

    def projected_rounds(self, model: Any, input_shape: tuple[int, ...], **common: Any) -> Any:
        """The schedule's rounds (full and partial), each with the bytes of what it uploads."""
        from fedsim import accounting

        return accounting.project_run(model, input_shape, schedule=self.schedule, **common)

    def plan_round(self, state: ServerState, round: int, cohort: tuple[int, ...]) -> RoundPlan:
        plan = super().plan_round(state, round, cohort)  # carries own_init in round 0 (init: independent)
        spec = self.schedule[round]
        if spec.phase == "full":
            return plan
        if plan.own_init:  # parse() rejects this config; guard a FedPart built around it
            raise FedsimError(
                f"fedpart run {self.cfg.label!r}: init: independent needs a full-network round 0; "
                "set warmup_rounds >= 1 or init: shared"
            )
        tensors = self.groups[spec.group].tensors
        return RoundPlan(
            round=round,
            cohort=cohort,
            local_epochs=plan.local_epochs,
            lr=plan.lr,
            momentum=plan.momentum,
            weight_decay=plan.weight_decay,
            phase="partial",
            layer=spec.group,
            trainable=tuple(k for k in tensors if k in self.param_names),
            upload=tensors,
        )
