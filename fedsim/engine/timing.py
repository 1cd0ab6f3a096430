"""The round loop's use of the virtual clock (:mod:`fedsim.system`): who a round dispatches,
when each client arrives, and the simulated time at which the round's model is ready.

For a run whose clients can be projected (every algorithm but those that need every client), a
client's bytes and multiply-accumulates are known before it trains: its download is what the
server sends it, its upload the plan's tensors (:meth:`Algorithm.upload_tensors`), its compute
examples x epochs x passes x F. The round rule (sync, deadline, over-selection) decides from these
times alone, so clients that will be dropped or left unused are never trained, and a client under
partial work trains exactly the steps that fit. After training, every logged byte and MAC is
checked against its projection: the times in the tables are the formula applied to the logged
columns. A run that needs every client (FedMA, PFNM, the one-shot and pooled baselines) trains
first and is timed from its logged bytes and MACs; a client offline at the round's start is
dispatched when it next comes online for long enough (:meth:`fedsim.system.world.World.first_fit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedsim import params as P
from fedsim.accounting import forward_cost
from fedsim.algorithms import Algorithm, ClientResult, RoundPlan, ServerState
from fedsim.config import ExperimentConfig, RoundRule, RunConfig
from fedsim.data.base import FederatedDataset
from fedsim.rng import sample_cohort
from fedsim.system import clock
from fedsim.system.world import World


@dataclass(frozen=True)
class Projection:
    """One client's projected traffic and compute, as the engine will log them.

    Attributes:
        bytes_down / bytes_up: bytes on the wire (encoded under a codec; with secure
            aggregation's protocol messages, which are ``protocol_down`` of ``bytes_down``).
        macs: training multiply-accumulates of the steps it will take.
        bytes_down_raw / bytes_up_raw: what they take uncompressed (numel x element size).
        protocol_down / protocol_up: secure aggregation's messages in ``bytes_down`` /
            ``bytes_up`` (0 without it); a client the rule does not train is billed its download
            without them.
    """

    bytes_down: int
    bytes_up: int
    macs: int
    bytes_down_raw: int = 0
    bytes_up_raw: int = 0
    protocol_down: int = 0
    protocol_up: int = 0

    @property
    def untrained_down(self) -> int:
        """Bytes billed to a client the rule does not train: its download without secure
        aggregation's messages."""
        return self.bytes_down - self.protocol_down


@dataclass(frozen=True)
class Schedule:
    """A projected round: the rule's decisions and each client's projection, by client id."""

    times: clock.RoundTimes
    projections: dict[int, Projection]

    @property
    def trained(self) -> list[clock.Decision]:
        """The decisions of the clients that train (those the round aggregates), cohort order."""
        return [d for d in self.times.decisions if d.outcome == clock.AGGREGATED]


class RunClock:
    """One run's virtual clock on the driver.

    Args:
        cfg: the experiment; run: the run; rule: its round rule; algo: its algorithm;
        sizes: each client's training examples; test_examples: the global test set's size;
        input_shape: one example's shape; world: devices and availability.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run: RunConfig,
        rule: RoundRule,
        algo: Algorithm,
        sizes: list[int],
        test_examples: int,
        input_shape: tuple[int, ...],
        world: World,
    ):
        self.cfg, self.run, self.rule, self.algo, self.world = cfg, run, rule, algo, world
        self.sizes, self.test_examples, self.input_shape = (
            [int(n) for n in sizes],
            int(test_examples),
            input_shape,
        )
        self._forward: int | None = None

    @classmethod
    def of(
        cls,
        cfg: ExperimentConfig,
        run: RunConfig,
        rule: RoundRule,
        algo: Algorithm,
        dataset: FederatedDataset,
        world: World,
    ) -> RunClock:
        """The clock of ``run`` over ``dataset``'s clients and test set."""
        sizes = [len(ix) for ix in dataset.client_indices]
        return cls(cfg, run, rule, algo, sizes, len(dataset.test), tuple(dataset.input_shape), world)

    @property
    def projects(self) -> bool:
        """Whether clients are timed before they train (every run but those needing every client)."""
        return not self.run.every_client

    def forward(self) -> int:
        """F, forward multiply-accumulates of one example at the global widths (thop's count, as
        the workers'); computed once."""
        if self._forward is None:
            self._forward = forward_cost(self.algo.reference_model(), self.input_shape, "thop")
        return self._forward

    def cohort(self, round: int, start_s: float) -> tuple[tuple[int, ...], float]:
        """(the round's clients, its start time). A run that needs every client takes them all at
        ``start_s``; otherwise k clients (ceil(overselect x k) under over-selection) are drawn
        from those online (:meth:`World.sample_cohort`)."""
        j, k = self.world.num_clients, self.cfg.engine.clients_per_round
        if not self.projects:
            return sample_cohort(self.cfg.seed, round, j, k), start_s
        if self.rule.mode == "overselect":
            k = min(j, clock.overselected(k, self.rule.overselect))
        return self.world.sample_cohort(self.cfg.seed, round, start_s, k)

    def project(
        self,
        state: ServerState,
        plan: RoundPlan,
        start_s: float,
        broadcast: dict[str, np.ndarray],
        own: list[dict[str, np.ndarray] | None],
        returning: list[bool],
    ) -> Schedule:
        """Time every client of ``plan.cohort`` before training and apply the round rule. Bytes
        are those on the wire: under an uplink or downlink codec the encoded lengths, under
        secure aggregation the masked vector plus the protocol's messages
        (:func:`fedsim.wire.wire_sizes`); a client's time is the formula applied to them.

        Args:
            broadcast, own: what the server sends (:func:`downlinks`).
            returning: whether each cohort client has stored state (MOON's frozen passes).
        """
        from fedsim.wire import wire_sizes

        f, run, rule = self.forward(), self.run, self.rule
        sizes = wire_sizes(run, len(plan.cohort))
        upload = self.algo.upload_tensors(state, plan)
        up_raw = P.nbytes(upload)
        up = (up_raw if sizes.upload is None else sizes.upload(upload)) + sizes.protocol_up
        raw_down = bytes_down(plan, broadcast, own)
        sent_down = raw_down if sizes.download is None else bytes_down(plan, broadcast, own, sizes.download)
        extra = 0 if plan.pooled else sizes.protocol_down
        cands, proj, partial_macs = [], {}, {}
        for c, down_sent, down_raw, back in zip(plan.cohort, sent_down, raw_down, returning):
            down = down_sent + extra
            dev, n = self.world.device(c), self.sizes[c]
            per_example = self.algo.training_passes(plan, back) * f
            macs = n * plan.local_epochs * per_example
            partial = None
            if rule.mode == "deadline" and rule.partial_work:
                total = plan.local_epochs * clock.steps_per_epoch(n, run.batch_size)
                s = clock.steps_that_fit(
                    dev, rule.deadline_s, down, up, n, run.batch_size, total, per_example
                )
                partial_macs[c] = clock.examples_in_steps(n, run.batch_size, s) * per_example
                partial = (s, clock.duration(dev, down, partial_macs[c], up))
            d = clock.duration(dev, down, macs, up)
            offline = self.world.availability.offline_at(c, start_s)
            cands.append(clock.Candidate(c, start_s, d, offline, partial))
            proj[c] = Projection(down, up, macs, down_raw, up_raw, extra, sizes.protocol_up)
        if rule.mode == "deadline":
            times = clock.deadline_round(start_s, rule.deadline_s, cands)
        elif rule.mode == "overselect":
            times = clock.overselect_round(start_s, self.cfg.engine.clients_per_round, cands)
        else:
            times = clock.sync_round(start_s, cands)
        for dec in times.decisions:  # partial work: the MACs of the steps it will take
            if dec.max_steps is not None:
                proj[dec.client_id] = replace(proj[dec.client_id], macs=partial_macs[dec.client_id])
        return Schedule(times, proj)

    def complete(
        self, schedule: Schedule, plan: RoundPlan, trained: list[ClientResult]
    ) -> list[ClientResult]:
        """Every cohort client's result in cohort order: the trained ones with their times, after
        checking their logged bytes and MACs against the projection, and a record for each client
        that was not trained (its download counted, nothing uploaded).

        Raises:
            RuntimeError: a logged byte or MAC count differs from its projection (a fedsim bug:
                an algorithm whose upload or compute the clock does not know).
        """
        by_id = {x.client_id: x for x in trained}
        out = []
        for dec in schedule.times.decisions:
            p = schedule.projections[dec.client_id]
            x = by_id.get(dec.client_id)
            if x is None:
                out.append(
                    ClientResult(
                        client_id=dec.client_id,
                        round=plan.round,
                        upload={},
                        n_examples=self.sizes[dec.client_id],
                        train_loss=float("nan"),
                        bytes_up=0,
                        bytes_down=p.untrained_down,
                        bytes_down_raw=p.bytes_down_raw,
                        seconds=0.0,
                        dropped=True,
                        outcome=dec.outcome,
                        sim_dispatch_s=dec.dispatch_s,
                        sim_arrival_s=dec.arrival_s,
                    )
                )
                continue
            if not x.dropped and (x.bytes_down, x.bytes_up, x.macs) != (p.bytes_down, p.bytes_up, p.macs):
                raise RuntimeError(
                    f"client {x.client_id} in round {plan.round} logged (bytes down, bytes up, MACs) = "
                    f"{(x.bytes_down, x.bytes_up, x.macs)} but the clock projected "
                    f"{(p.bytes_down, p.bytes_up, p.macs)} for {self.run.algorithm}; this is a fedsim bug "
                    "(Algorithm.upload_tensors or training_passes); run it with system mode sync meanwhile"
                )
            outcome = clock.DROPPED_TIMEOUT if x.dropped else dec.outcome
            out.append(
                replace(x, outcome=outcome, sim_dispatch_s=dec.dispatch_s, sim_arrival_s=dec.arrival_s)
            )
        return out

    def time_logged(self, start_s: float, results: list[ClientResult]) -> tuple[list[ClientResult], float]:
        """A round of a run that needs every client, timed from its logged bytes and MACs: each
        client dispatched at its first online window long enough for its work. Returns (results
        with their times, the time its last client arrives)."""
        cands = []
        for x in results:
            if not x.dropped:  # a wall-clock timeout has no time on the simulated clock
                d = clock.duration(self.world.device(x.client_id), x.bytes_down, x.macs, x.bytes_up)
                start = self.world.first_fit(x.client_id, start_s, d)
                cands.append(clock.Candidate(x.client_id, start, d, math.inf))
        times = clock.sync_round(start_s, cands)
        by_id = {d.client_id: d for d in times.decisions}
        done = []
        for x in results:
            dec = by_id.get(x.client_id)
            if dec is None:
                done.append(replace(x, outcome=clock.DROPPED_TIMEOUT))
            else:
                done.append(
                    replace(
                        x, outcome=dec.outcome, sim_dispatch_s=dec.dispatch_s, sim_arrival_s=dec.arrival_s
                    )
                )
        return done, times.end_s

    def server_seconds(self, kept: list[ClientResult], evaluated: bool) -> float:
        """Simulated seconds the server spends on a round: one multiply-accumulate per uploaded
        scalar of each aggregated client, plus F per test example when the round is evaluated,
        at ``system.server_macs_per_s`` (0 when that is null)."""
        return self.server_seconds_for(sum(int(v.size) for x in kept for v in x.upload.values()), evaluated)

    def server_seconds_for(self, uploaded_scalars: int, evaluated: bool) -> float:
        """:meth:`server_seconds` from the number of scalars the aggregated clients uploaded."""
        speed = self.world.server_macs_per_s
        if speed is None:
            return 0.0
        macs = uploaded_scalars + (self.test_examples * self.forward() if evaluated else 0)
        return macs / speed


def downlinks(
    algo: Algorithm, state: ServerState, plan: RoundPlan
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray] | None]]:
    """What the server sends in ``plan``: (the broadcast, name -> numpy array; each cohort client's
    own extra tensors, or None), as the round loop sends them and the clock bills them."""
    own = [algo.client_downlink(state, plan, c) for c in plan.cohort]
    return P.to_numpy(algo.downlink(state, plan)), [None if d is None else P.to_numpy(d) for d in own]


def bytes_down(
    plan: RoundPlan,
    broadcast: dict[str, Any],
    own: list[dict[str, Any] | None],
    size: Callable[[dict[str, Any]], int] | None = None,
) -> list[int]:
    """Each cohort client's download in bytes, as the engine logs it: the broadcast merged with
    its own extra tensors (numel x element size), or under a downlink codec ``size`` (its
    encoded length, :attr:`fedsim.wire.WireSizes.download`) of the broadcast plus the extras
    uncompressed (only FedMA and PFNM send extras, and they take no codec); 0 in a pooled round."""
    if plan.pooled:
        return [0] * len(own)
    if size is None:
        return [P.nbytes({**broadcast, **(d or {})}) for d in own]
    sent = size(broadcast)
    return [sent + P.nbytes(d or {}) for d in own]


def check_deadlines(cfg: ExperimentConfig, dataset: FederatedDataset, world: World) -> None:
    """Before a run starts: every run under a deadline has a client that can meet it in round 0
    (its full work, or with ``partial_work`` one local step), with every client online.

    Raises:
        FedsimError: a run's deadline no client can meet, naming the key and the fastest time.
    """
    from fedsim.algorithms import ALGORITHMS
    from fedsim.errors import FedsimError
    from fedsim.system.availability import AlwaysOnline

    always = World(world.devices, AlwaysOnline(), world.server_macs_per_s)
    for i, run in enumerate(cfg.runs):
        rule = cfg.round_rule(run)
        if rule is None or rule.mode != "deadline":
            continue
        algo = ALGORITHMS[run.algorithm](run, cfg, dataset.num_classes, tuple(dataset.input_shape))
        state = algo.init_state(P.clone(algo.reference_model().state_dict()))
        plan = algo.plan_round(state, 0, tuple(range(dataset.num_clients)))
        broadcast, own = downlinks(algo, state, plan)
        timer = RunClock.of(cfg, run, rule, algo, dataset, always)
        sched = timer.project(state, plan, 0.0, broadcast, own, [False] * len(own))
        if not sched.trained:
            key = f"runs.{i}.system.deadline_s" if run.system is not None else "system.deadline_s"
            fastest = min(d.arrival_s for d in sched.times.decisions)
            raise FedsimError(
                f"config key '{key}': no client of run {run.label!r} can meet the {rule.deadline_s:g} s deadline "
                f"(the fastest needs {fastest:.3g} s in round 0); raise the deadline"
                + ("" if rule.partial_work else " or set partial_work: true")
            )
