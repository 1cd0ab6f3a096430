"""Typed, frozen experiment configuration with strict YAML loading.

One file is one experiment: several runs (algorithms) that share data, partition, model and seed,
so they are compared on identical clients and identical cohorts. Unknown keys and wrong types are
errors that name the key (nanoGPT-style strict overrides). Each algorithm has its own run config
class (a subclass of :class:`RunConfig`, set as the algorithm's ``Config``) holding its specific
keys, e.g. ``mu`` for FedProx, so a key that does not apply to an algorithm is rejected instead of
silently ignored. The built-in algorithms' run configs live here, listed in :data:`RUN_CONFIGS`,
so that validating a config that names only them imports no torch. An algorithm added in its own
module may define its ``Config`` there: a config naming it is validated through the registry
(:func:`run_configs`), which imports the algorithms (and torch).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedsim.errors import FedsimError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataConfig(_Strict):
    """``data:`` section. Sizes are in examples."""

    dataset: str = Field(
        "digits",
        description="digits, shakespeare, synthetic, mnist, fashion_mnist, cifar10, cifar100, hf (a Hugging "
        "Face dataset, see path), or a name registered with fedsim.data.register_dataset",
    )
    partition: Literal[
        "iid",
        "dirichlet",
        "hetero_dir",
        "natural",
        "bias",
        "grouped_natural",
        "flwr_dirichlet",
        "shard",
        "pathological",
        "linear",
        "square",
        "exponential",
        "power_law",
    ] = Field(
        "dirichlet",
        description="how examples are split over clients: iid; dirichlet (the FedMA authors' hetero-dir recipe); "
        "hetero_dir (that recipe drawn as the authors' code draws it, index for index); "
        "natural (one client per id: Shakespeare roles, or the partition_by column); bias (FedMA's "
        "data-bias split); grouped_natural, flwr_dirichlet, shard, pathological, linear, square, exponential, power_law "
        "(Flower Datasets' partitioners, docs/data.md)",
    )
    alpha: float = Field(
        0.5, description="Dirichlet concentration (partition: dirichlet, hetero_dir, flwr_dirichlet)"
    )
    num_clients: int | None = Field(
        10,
        description="J, the number of simulated clients; with partition natural (grouped_natural) on an id "
        "column, the first J ids in sorted order (the first J groups), and null takes them all",
    )
    data_dir: str | None = Field(
        None,
        description="where dataset files live (MNIST, CIFAR in torchvision's layout; Fashion-MNIST's IDX "
        "files); null: Fashion-MNIST from Debian's dataset-fashion-mnist package",
    )
    download: bool = Field(False, description="download a missing dataset (needs the network)")
    train_fraction: float = Field(
        0.8,
        description="share of each client's (or role's) examples used for training where the dataset has no test split",
    )
    min_samples: int | None = Field(
        None,
        description="Shakespeare: keep roles with more than this many windows; null: 10,000 (FedMA's filter)",
    )
    examples_per_client: int | None = Field(
        None, description="cap each client at this many training examples (a seeded sample)"
    )
    synthetic_alpha: float = Field(1.0, description="synthetic: std of the per-client model shift u_k")
    synthetic_beta: float = Field(1.0, description="synthetic: std of the per-client feature shift B_k")
    path: str | None = Field(
        None,
        description="hf: a Hub dataset name (e.g. flwrlabs/femnist), or offline a save_to_disk directory "
        "or a directory of Parquet files",
    )
    train_split: str = Field("train", description="hf: the split clients train on")
    test_split: str | None = Field(
        None,
        description="hf: the split the server evaluates on; null: each client keeps train_fraction of its "
        "examples for training and the rest joins the test set, as LEAF does",
    )
    image_column: str | None = Field(
        None, description="hf: the image column (PIL images or encoded bytes); null: 'image' or 'img'"
    )
    text_column: str | None = Field(
        None,
        description="hf: a column of fixed-length strings (flwrlabs/shakespeare: x), tokenised per "
        "character with LEAF's 80-symbol vocabulary instead of reading images",
    )
    label_column: str = Field(
        "label",
        description="hf: the class-label column, integers (or single characters with text_column)",
    )
    partition_by: str | None = Field(
        None,
        description="hf and registered datasets: the natural-id column of partition natural and "
        "grouped_natural (e.g. writer_id)",
    )
    group_size: int | None = Field(
        None, description="grouped_natural: natural ids per client (Flower's GroupedNaturalIdPartitioner)"
    )
    group_mode: Literal["allow-smaller", "allow-bigger", "drop-reminder", "strict"] = Field(
        "allow-smaller",
        description="grouped_natural: what happens to the ids left over (Flower's names: a smaller last "
        "group, bigger first groups, dropped, or an error)",
    )
    sort_unique_ids: bool = Field(
        False,
        description="grouped_natural: group the ids in sorted order instead of order of first appearance",
    )
    min_partition_size: int = Field(
        10,
        description="dirichlet, flwr_dirichlet: redraw until every client holds at least this many examples",
    )
    self_balancing: bool = Field(
        False,
        description="flwr_dirichlet: give no more of a class to clients above the average size (Flower's option)",
    )
    shards_per_client: int | None = Field(
        None, description="shard: shards dealt to each client (McMahan et al.: 2); null: from shard_size"
    )
    shard_size: int | None = Field(
        None, description="shard: examples per shard; null: N / (num_clients * shards_per_client)"
    )
    keep_incomplete_shard: bool = Field(
        False,
        description="shard: also deal the last, shorter shard (ignored when shards_per_client and shard_size are both set)",
    )
    classes_per_client: int | None = Field(None, description="pathological: classes each client holds (k)")
    class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] = Field(
        "random",
        description="pathological: how classes are given to clients (random: k drawn per client; "
        "deterministic: j..j+k-1; first-deterministic: j, then random)",
    )
    power_law_exponent: float = Field(
        1.5, description="power_law: client j = 1..J holds a share proportional to j ** this"
    )


class ModelConfig(_Strict):
    """``model:`` section; ``widths`` overrides hidden-layer unit counts."""

    name: str = Field(
        "digits_cnn",
        description="model name (digits_cnn, lenet, lenet_fedma, vgg9, char_lstm, resnet8, resnet18, logreg, moon_cnn, <model>+moon)",
    )
    widths: dict[str, int] | None = Field(
        None, description="hidden-layer unit counts by layer name; null: the model's defaults"
    )


class EngineConfig(_Strict):
    """``engine:`` section: how client work is scheduled.

    ``cpus_per_worker`` and ``gpus_per_worker`` are Ray resource requests of one ClientWorker
    actor (``gpus_per_worker: 0.25`` puts four workers on a GPU); ``num_workers: auto`` sizes the
    pool from the cluster's resources, capped at ``clients_per_round``.
    """

    backend: Literal["ray", "sequential"] = Field(
        "ray",
        description="ray: a driver actor and a pool of ClientWorker actors; sequential: everything in this process",
    )
    clients_per_round: int = Field(10, description="cohort size, sampled per round from (seed, round)")
    num_workers: Literal["auto"] | int = Field(
        "auto", description="ClientWorker actors; auto: what the cluster fits, at most clients_per_round"
    )
    cpus_per_worker: float = Field(
        1.0, description="CPUs each ClientWorker requests (also its torch threads)"
    )
    gpus_per_worker: float = Field(
        0.0, description="GPU share each ClientWorker requests (0.25: four workers per GPU)"
    )
    eval_every: int = Field(
        1, description="evaluate the global model every this many rounds (and after the last)"
    )
    eval_batch_size: int = Field(1024, description="examples per evaluation batch")
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join (host:port or ray://host:port); null: RAY_ADDRESS if set "
        "(Ray Jobs sets it), else start a local Ray",
    )
    max_attempts: int = Field(3, description="tries per client task when its worker dies")
    round_timeout_s: float | None = Field(None, description="seconds a round may take; null: no deadline")
    timeout_policy: Literal["wait", "drop", "fail"] = Field(
        "drop", description="at the deadline: wait anyway, drop late clients, or fail the run"
    )
    checkpoint_every: int = Field(
        1, description="write the run's checkpoint every this many rounds (and after the last)"
    )
    vectorize: Literal["auto", "always", "never"] = Field(
        "auto",
        description="train the clients of a worker's call as one stacked model (same results up to "
        "float rounding). always: wherever the algorithm and model allow it (and say once per run "
        "when they do not); auto: there too, but on a CPU only for models of at most 600,000 "
        "multiply-accumulates per example, where stacking was measured faster (docs/performance.md); "
        "never: one by one",
    )
    vectorize_max_clients: int = Field(
        64,
        description="clients stacked at most at once; more are chunked (a chunk that runs out of GPU "
        "memory is split in halves, which changes no result)",
    )
    worker_resources: dict[str, float] | None = Field(
        None,
        description="extra Ray resources each ClientWorker requests, e.g. {fedsim_worker: 0.001} "
        "to place workers only on nodes that advertise fedsim_worker (ray_cluster.yaml)",
    )


class Distribution(_Strict):
    """How one device quantity is spread over the clients (``system.devices``): each client's
    value is one draw from its own (seed, "devices", quantity, client) stream.

    * ``constant``: every client gets ``value``;
    * ``lognormal``: ``median * exp(sigma * z)``, z standard normal (``sigma`` is the standard
      deviation of the natural log; the median is the distribution's, not the population's);
    * ``uniform``: uniform on [``low``, ``high``].
    """

    distribution: Literal["constant", "lognormal", "uniform"] = Field(
        "constant", description="constant, lognormal (median, sigma) or uniform (low, high)"
    )
    value: float | None = Field(None, description="constant: every client's value")
    median: float | None = Field(None, description="lognormal: the median")
    sigma: float = Field(0.0, description="lognormal: standard deviation of the natural log (>= 0)")
    low: float | None = Field(None, description="uniform: lower bound")
    high: float | None = Field(None, description="uniform: upper bound")


class DeviceTier(_Strict):
    """One named tier of devices (``system.devices.tiers``): a share of the clients with identical
    devices. Units: multiply-accumulates per second, bytes per second, seconds (one way)."""

    name: str = Field(description="tier name, e.g. fast or slow")
    fraction: float = Field(description="share of the clients in this tier; the fractions sum to 1")
    compute_macs_per_s: float = Field(description="training throughput, multiply-accumulates per second")
    uplink_bytes_per_s: float = Field(description="client-to-server bandwidth, bytes per second")
    downlink_bytes_per_s: float = Field(description="server-to-client bandwidth, bytes per second")
    latency_s: float = Field(0.0, description="one-way latency of each message, seconds")


_QUANTITY_NAMES = ("compute_macs_per_s", "uplink_bytes_per_s", "downlink_bytes_per_s", "latency_s")


class DevicesConfig(_Strict):
    """``system.devices``: each client's device. Exactly one source: per-quantity distributions
    (the default: every quantity constant, every device identical), ``tiers`` (named shares of
    identical devices; clients are assigned by a seeded permutation), or ``trace`` (a Parquet
    table of device profiles, docs/heterogeneity.md; clients map to profiles by a seeded draw).
    A number stands for a constant distribution."""

    compute_macs_per_s: Distribution = Field(
        Distribution(value=1.0e9),
        description="training throughput, multiply-accumulates per second (a number or a distribution)",
    )
    uplink_bytes_per_s: Distribution = Field(
        Distribution(value=1.25e6),
        description="client-to-server bandwidth, bytes per second (1.25e6 = 10 Mbit/s)",
    )
    downlink_bytes_per_s: Distribution = Field(
        Distribution(value=6.25e6),
        description="server-to-client bandwidth, bytes per second (6.25e6 = 50 Mbit/s)",
    )
    latency_s: Distribution = Field(
        Distribution(value=0.05), description="one-way latency of each message, seconds"
    )
    tiers: list[DeviceTier] | None = Field(
        None, description="named tiers with fractions instead of distributions"
    )

    @field_validator(*_QUANTITY_NAMES, mode="before")
    @classmethod
    def _number_is_constant(cls, v: Any) -> Any:
        """A bare number stands for a constant distribution."""
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {"distribution": "constant", "value": float(v)}
        return v

    trace: str | None = Field(
        None,
        description="Parquet file of device profiles (schema in docs/heterogeneity.md) instead of distributions",
    )


class AvailabilityConfig(_Strict):
    """``system.availability``: when each client is online, a pure function of (client, simulated
    time). ``always``: every client, all the time. ``daily``: online for ``on_fraction`` of every
    ``period_s`` seconds, from a phase drawn per client from the (seed, "availability", 0, client)
    stream. ``trace``: the intervals of a Parquet table (schema in docs/heterogeneity.md), clients
    mapped to its traces by a seeded draw."""

    kind: Literal["always", "daily", "trace"] = Field("always", description="always, daily or trace")
    on_fraction: float = Field(0.5, description="daily: share of each period a client is online, in (0, 1]")
    period_s: float = Field(86400.0, description="daily: the cycle's length, simulated seconds")
    trace: str | None = Field(None, description="trace: Parquet file of online intervals")


class RoundRule(_Strict):
    """When a synchronous round ends and which clients it aggregates (docs/heterogeneity.md).

    * ``sync``: the round ends when its last client arrives;
    * ``deadline``: the round lasts at most ``deadline_s`` simulated seconds; a client that cannot
      arrive by then is dropped (its download counted, its upload not), or with ``partial_work``
      trains only the local steps that fit (FedProx's variable amount of work, Li et al. 2020);
    * ``overselect``: ceil(``overselect`` x k) clients are sampled and the first k to arrive are
      aggregated (Bonawitz et al. 2019; FedScale's over-commitment); the others are not trained.
    """

    mode: Literal["sync", "deadline", "overselect"] = Field(
        "sync", description="sync, deadline or overselect: when a round ends and whom it aggregates"
    )
    deadline_s: float | None = Field(None, description="deadline: a round's length, simulated seconds")
    partial_work: bool = Field(
        False, description="deadline: a late client trains the local steps that fit instead of being dropped"
    )
    overselect: float = Field(
        1.3, description="overselect: clients sampled per aggregated client (ceil(overselect x k) sampled)"
    )


class SystemConfig(RoundRule):
    """``system:`` section: the simulated world of devices, availability and a virtual clock
    (docs/heterogeneity.md). Without it fedsim simulates an ideal federation and logs no
    simulated time. The round rule set here (``mode``, ``deadline_s``, ``partial_work``,
    ``overselect``) applies to every run; a run's own ``system:`` overrides it."""

    devices: DevicesConfig = DevicesConfig()
    availability: AvailabilityConfig = AvailabilityConfig()
    server_macs_per_s: float | None = Field(
        None,
        description="the server's throughput for aggregation and evaluation, multiply-accumulates per "
        "second; null: the server takes no simulated time",
    )


class CodecConfig(_Strict):
    """``uplink:`` (or ``downlink:``) section of a run: the codec that encodes what each client
    uploads (or the server's broadcast; docs/compression.md has every codec's byte formula). Each codec takes only its own
    parameter: ``quantize`` ``bits``, ``qsgd`` ``levels``, ``topk`` and ``randk`` ``fraction``,
    ``powersgd`` ``rank``."""

    codec: Literal["fp16", "bf16", "quantize", "qsgd", "topk", "randk", "sign", "powersgd"] = Field(
        description="fp16 / bf16 casts; quantize: stochastic b-bit; qsgd: s levels and the l2 norm; "
        "topk / randk: a fraction of the values; sign: scaled sign; powersgd: rank-r factors"
    )
    bits: int | None = Field(None, description="quantize: bits per value, 1..16 (required)")
    levels: int | None = Field(None, description="qsgd: quantisation levels s, 1..65535 (required)")
    fraction: float | None = Field(
        None, description="topk / randk: share of each tensor's values sent, in (0, 1] (required)"
    )
    rank: int | None = Field(None, description="powersgd: rank r of the factors, >= 1 (required)")
    rotation: bool = Field(
        False,
        exclude_if=lambda v: not v,  # a codec without rotation dumps (config_json) as before
        description="quantize / qsgd: quantise a randomised Hadamard rotation of each tensor "
        "(Suresh et al. 2017), zero-padded to a power of two",
    )
    error_feedback: bool = Field(
        False,
        description="keep what the codec lost in the client's state and add it to the next upload "
        "(biased codecs: fp16, bf16, topk, sign, powersgd)",
    )

    def check_downlink(self, where: str, algorithm: str) -> None:
        """:meth:`check` for the ``downlink:`` section, which sends the model itself (a client
        that missed the last round holds no model to add a delta to): only fp16, bf16 and
        quantize, and no error feedback.

        Raises:
            FedsimError: as :meth:`check`, or another codec, or error feedback."""
        if self.codec not in ("fp16", "bf16", "quantize"):
            raise FedsimError(
                f"config key '{where}.codec': the downlink sends the model itself, which {self.codec} "
                "cannot carry (a client that missed the last round has no model to add a delta to); "
                "use fp16, bf16 or quantize"
            )
        if self.error_feedback:
            raise FedsimError(
                f"config key '{where}.error_feedback' does not apply to the downlink; remove it"
            )
        self.check(where, algorithm)

    def check(self, where: str, algorithm: str) -> None:
        """Raises FedsimError naming the key: a parameter missing, out of range or given to a codec
        that takes another, error feedback on an unbiased codec, or an algorithm no codec serves."""
        from fedsim.wire import CODECS, REFUSED

        if algorithm in REFUSED:
            raise FedsimError(f"config key '{where}': a codec cannot serve {algorithm}: {REFUSED[algorithm]}")
        own = {
            "quantize": "bits",
            "qsgd": "levels",
            "topk": "fraction",
            "randk": "fraction",
            "powersgd": "rank",
        }
        for key in ("bits", "levels", "fraction", "rank"):
            if getattr(self, key) is not None and own.get(self.codec) != key:
                raise FedsimError(
                    f"config key '{where}.{key}' does not apply to codec {self.codec}; remove it"
                )
        key = own.get(self.codec)
        value = None if key is None else getattr(self, key)
        if key is not None and value is None:
            raise FedsimError(f"config key '{where}.{key}' is required for codec {self.codec}")
        ranges = {"bits": (1, 16), "levels": (1, 65535), "rank": (1, None)}
        if key == "fraction" and not 0 < value <= 1:
            raise FedsimError(f"config key '{where}.fraction' must be in (0, 1] (got {value})")
        if key in ranges:
            lo, hi = ranges[key]
            if value < lo or (hi is not None and value > hi):
                span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                raise FedsimError(f"config key '{where}.{key}' must be {span} (got {value})")
        if self.rotation and self.codec not in ("quantize", "qsgd"):
            raise FedsimError(
                f"config key '{where}.rotation' applies to codecs quantize and qsgd only; remove it"
            )
        if self.error_feedback and not CODECS[self.codec].biased:
            raise FedsimError(
                f"config key '{where}.error_feedback': codec {self.codec} is unbiased and needs no "
                "error feedback; remove it or use fp16, bf16, topk, sign or powersgd"
            )


class SecAggConfig(_Strict):
    """``secure_aggregation:`` section of a run: a cost model of secure aggregation
    (docs/compression.md). Clients clip each update coordinate to [-clip, clip] and quantise it to
    ``bits`` bits; the masked vector takes R = bits + ceil(log2 n) bits per coordinate for a
    cohort of n, and each client is billed the protocol's key, share and unmasking messages."""

    protocol: Literal["secagg", "secagg_plus"] = Field(
        description="secagg: every client shares keys with all others (Bonawitz et al. 2017); "
        "secagg_plus: with k neighbours (Bell et al. 2020)"
    )
    neighbours: int | None = Field(None, description="secagg_plus: k, neighbours per client, >= 1 (required)")
    bits: int = Field(16, description="b, fixed-point bits per update coordinate, 1..16")
    clip: float = Field(1.0, description="each update coordinate is clipped to [-clip, clip] (> 0)")

    def check(self, where: str, algorithm: str, uplink: CodecConfig | None) -> None:
        """Raises FedsimError naming the key: a value out of range, ``neighbours`` missing for
        secagg_plus or given to secagg, an uplink codec beside it, or an algorithm it cannot serve."""
        from fedsim.wire.secagg import REFUSED

        if algorithm in REFUSED:
            raise FedsimError(
                f"config key '{where}': secure aggregation cannot serve {algorithm}: {REFUSED[algorithm]}"
            )
        if uplink is not None:
            raise FedsimError(
                f"config key '{where}': secure aggregation sums fixed-point vectors, so it cannot carry "
                "an uplink codec's messages; remove uplink (its bits are the codec)"
            )
        if self.protocol == "secagg_plus" and (self.neighbours is None or self.neighbours < 1):
            raise FedsimError(
                f"config key '{where}.neighbours' must be >= 1 for secagg_plus (got {self.neighbours})"
            )
        if self.protocol == "secagg" and self.neighbours is not None:
            raise FedsimError(
                f"config key '{where}.neighbours' does not apply to secagg (every client is a neighbour); "
                "remove it or use secagg_plus"
            )
        if not 1 <= self.bits <= 16:
            raise FedsimError(f"config key '{where}.bits' must be 1..16 (got {self.bits})")
        if not self.clip > 0:
            raise FedsimError(f"config key '{where}.clip' must be > 0 (got {self.clip})")


class RunConfig(_Strict):
    """One entry of ``runs:``: an algorithm with its local-training hyper-parameters.

    Units: ``rounds`` communication rounds, ``local_epochs`` passes over a client's data,
    ``batch_size`` examples. ``bn_stats``: BatchNorm running statistics are averaged like weights
    (``shared``) or stay with each client (``local``, FedPart's authors' code), for every
    algorithm. Subclasses add algorithm-specific keys.

    """

    algorithm: str
    """Registered algorithm name (required): one of ``fedsim.algorithms.ALGORITHMS``."""
    name: str | None = None
    """The run's id (``run_id`` in the tables); null: the algorithm's name. Ids must differ."""
    rounds: int = Field(20, description="communication rounds")
    local_epochs: int = Field(1, description="passes over a client's data per round")
    lr: float = Field(0.05, description="client learning rate")
    batch_size: int = Field(32, description="examples per local minibatch")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="client optimiser")
    momentum: float = Field(0.0, description="client SGD momentum")
    weight_decay: float = Field(0.0, description="client L2 weight decay")
    bn_stats: Literal["shared", "local"] = Field(
        "shared",
        description="BatchNorm running statistics averaged like weights (shared) or kept by each client (local)",
    )
    system: RoundRule | None = Field(
        None, description="this run's round rule (mode, deadline_s, partial_work, overselect); null: system's"
    )
    #: every client takes part in every round and the round waits for each (matching, one-shot and
    #: pooled baselines): such a run is synchronous only, and an offline client delays its round
    every_client: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        """The run's keys as a JSON-serialisable dict; ``system`` only when set, so a run without
        one writes the ``config_json`` it did before round rules existed."""
        return self.model_dump(mode="json", exclude=None if self.system is not None else {"system"})

    uplink: CodecConfig | None = Field(
        None,
        exclude_if=lambda v: v is None,  # a run without a codec dumps (config_json) as before
        description="encode each client's upload with a codec, e.g. {codec: topk, fraction: 0.01, "
        "error_feedback: true}; null: float tensors as they are (docs/compression.md)",
    )
    downlink: CodecConfig | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="encode the server's broadcast (the model itself) with fp16, bf16 or quantize; "
        "null: as it is (docs/compression.md)",
    )
    secure_aggregation: SecAggConfig | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="simulate secure aggregation's fixed-point updates and bill its traffic, e.g. "
        "{protocol: secagg_plus, neighbours: 8, bits: 16}; null: none (docs/compression.md)",
    )

    @property
    def label(self) -> str:
        """The run's id within its experiment: ``name`` or the algorithm's name."""
        return self.name or self.algorithm

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        """Algorithm-specific range checks; ``where`` is the run's key path, e.g. ``runs.1``.

        Raises:
            FedsimError: a value is out of range (subclasses override).
        """


# ------------------------------------------------- the algorithms' run configs
# Here, not in the algorithm modules, so that validating a config imports no torch: a typo
# in a config file is reported in a fraction of a second.


class FullNetworkConfig(RunConfig):
    """A run whose clients train the whole network from the server's model (fedavg, and the base
    of fedprox, moon and fedpart): adds where round 0 starts.

    ``init: shared`` (default) starts every client of round 0 from the server's initial model,
    as every later round starts from the server's model. ``init: independent`` is the FedMA
    paper's baseline protocol "without a shared initialisation" (Wang et al., ICLR 2020, App. A;
    IBM/FedMA main.py: ``local_train`` trains each client's own init, ``averaged_weights`` is
    their example-weighted mean, and ``fedavg_comm``/``fedprox_comm`` continue from it): in round
    0 each client trains from its own initialisation (the (seed, "init", 0, client + 1) stream, as
    FedMA's clients), nothing is sent down (0 bytes), the local loss is the plain cross-entropy
    (nothing was received for FedProx's proximal or MOON's contrastive term to refer to), and the
    round's aggregate averages these independently trained models; from round 1 on the run is the
    ordinary algorithm. FedPart's round 0 must then be a full-network warm-up round. Algorithms
    with fixed start semantics (fedma, pfnm, ensemble, local, entire_data) have no ``init`` key.
    """

    init: Literal["shared", "independent"] = "shared"
    """Round 0's start: the server's initial model (shared) or each client's own initialisation."""
    independent_weight_decay: float | None = Field(
        None,
        exclude_if=lambda v: v is None,  # a run without it dumps (config_json) as before
        description="L2 weight decay of round 0's local training under init: independent (>= 0); "
        "null: the run's weight_decay. The FedMA authors' code trains the independent local models "
        "without weight decay and applies 1e-4 only from round 1 on (IBM/FedMA main.py:109 and :777): "
        "independent_weight_decay: 0 with weight_decay: 0.0001",
    )


class FedProxConfig(FullNetworkConfig):
    """FedProx run: ``mu`` is the proximal coefficient (FedMA's baselines: 0.001)."""

    mu: float = 0.001
    """Proximal coefficient mu in (mu / 2) ||w - w_global||^2 (>= 0)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if self.mu < 0:
            raise FedsimError(
                f"config key '{where}.mu' must be >= 0 (got {self.mu}); FedProx's grid is "
                "0.001, 0.01, 0.1, 0.5, 1"
            )


class MoonConfig(FullNetworkConfig):
    """MOON run: ``mu`` weighs the contrastive loss (paper: 5 on CIFAR-10, 1 on CIFAR-100);
    ``tau`` is the temperature (0.5)."""

    mu: float = 5.0
    """Weight of the model-contrastive loss (>= 0)."""
    tau: float = 0.5
    """Temperature of the model-contrastive loss (> 0)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if self.mu < 0 or not self.tau > 0:
            raise FedsimError(
                f"config keys '{where}.mu' >= 0 and '{where}.tau' > 0 are required "
                f"(got mu={self.mu}, tau={self.tau})"
            )


class FedPartConfig(FullNetworkConfig):
    """FedPart run. ``rounds`` is not set: it follows from cycles * (W + R * G).

    ``mu``: FedProx's proximal or MOON's contrastive coefficient (defaults 0.001 and 5);
    ``tau``: MOON's temperature.
    """

    rounds: int | None = None
    """Must stay unset: the run has cycles * (warmup_rounds + rounds_per_group * G) rounds."""
    optimizer: Literal["sgd", "adam"] = "adam"
    """Client optimiser, recreated each round over the trainable tensors (the paper: Adam)."""
    lr: float = 1e-3
    """Client learning rate (the paper: 1e-3 with Adam)."""
    warmup_rounds: int = 5
    """W: full-network rounds at the start of each cycle (>= 0)."""
    rounds_per_group: int = 2
    """R: rounds each layer group trains in a cycle (>= 1)."""
    cycles: int = 1
    """C: cycles of W full rounds and a sweep over the G layer groups (>= 1)."""
    order: Literal["sequential", "reverse", "random"] = "sequential"
    """Layer-group order in a sweep: shallow to deep, deep to shallow, or a seeded permutation per cycle."""
    local_objective: Literal["fedavg", "fedprox", "moon"] = "fedavg"
    """Local loss: cross-entropy, plus FedProx's proximal or MOON's contrastive term."""
    mu: float | None = None
    """Coefficient of the proximal or contrastive term; null: 0.001 (fedprox) or 5 (moon)."""
    tau: float = 0.5
    """MOON's temperature (local_objective: moon)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if self.rounds is not None:
            raise FedsimError(
                f"config key '{where}.rounds': fedpart's rounds follow from cycles, warmup_rounds "
                "and rounds_per_group; remove rounds and set cycles"
            )
        if self.warmup_rounds < 0 or self.rounds_per_group < 1 or self.cycles < 1:
            raise FedsimError(
                f"'{where}': fedpart needs warmup_rounds >= 0, rounds_per_group >= 1 and cycles >= 1"
            )
        if self.init == "independent" and self.warmup_rounds == 0:
            raise FedsimError(
                f"config key '{where}.init': independent needs a whole-network round 0, but with "
                "warmup_rounds 0 fedpart's round 0 is partial; set warmup_rounds >= 1 or init: shared"
            )


class FedAvgMConfig(FullNetworkConfig):
    """FedAvgM run (Hsu et al. 2019; Reddi et al., ICLR 2021): server SGD with momentum on the
    pseudo-gradient. ``server_lr``: eta_s (1.0); ``server_momentum``: beta (0.9). With
    ``server_momentum: 0`` and ``server_lr: 1`` it is FedAvg."""

    server_lr: float = 1.0
    """Server learning rate eta_s (> 0)."""
    server_momentum: float = 0.9
    """Server momentum beta, in [0, 1)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if not self.server_lr > 0 or not 0 <= self.server_momentum < 1:
            raise FedsimError(
                f"config keys '{where}.server_lr' > 0 and 0 <= '{where}.server_momentum' < 1 are "
                f"required (got server_lr={self.server_lr}, server_momentum={self.server_momentum})"
            )


class FedAdagradConfig(FullNetworkConfig):
    """FedAdagrad run (Reddi et al., ICLR 2021, Algorithm 2): ``server_lr`` eta (0.01), ``beta1``
    the first-moment decay (0.9), ``epsilon`` the paper's tau (1e-3, also v's initial value's root)."""

    server_lr: float = 0.01
    """Server learning rate eta (> 0)."""
    beta1: float = 0.9
    """First-moment decay, in [0, 1)."""
    epsilon: float = 1e-3
    """The paper's tau, the adaptivity constant (> 0); v starts at its square."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if not self.server_lr > 0 or not self.epsilon > 0 or not 0 <= self.beta1 < 1:
            raise FedsimError(
                f"config keys '{where}.server_lr' > 0, '{where}.epsilon' > 0 and "
                f"0 <= '{where}.beta1' < 1 are required (got server_lr={self.server_lr}, "
                f"epsilon={self.epsilon}, beta1={self.beta1})"
            )


class FedAdamConfig(FedAdagradConfig):
    """FedAdam and FedYogi runs (Reddi et al., ICLR 2021, Algorithm 2): FedAdagrad's keys plus
    ``beta2``, the second-moment decay (0.99)."""

    beta2: float = 0.99
    """Second-moment decay, in [0, 1)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        super().check(where, experiment)
        if not 0 <= self.beta2 < 1:
            raise FedsimError(f"config key '{where}.beta2' must be in [0, 1) (got {self.beta2})")


class ScaffoldConfig(FullNetworkConfig):
    """SCAFFOLD run (Karimireddy et al., ICML 2020, Algorithm 1, option II): ``server_lr`` is the
    global step size eta_g (1.0). Local training must be SGD (the paper's setting; option II's
    control variate divides the model's displacement by K * lr)."""

    server_lr: float = 1.0
    """Global step size eta_g (> 0)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if not self.server_lr > 0:
            raise FedsimError(f"config key '{where}.server_lr' must be > 0 (got {self.server_lr})")
        if self.optimizer != "sgd":
            raise FedsimError(
                f"config key '{where}.optimizer': scaffold's control variates assume local SGD; "
                "set optimizer: sgd"
            )


class FedNovaConfig(FullNetworkConfig):
    """FedNova run (Wang et al., NeurIPS 2020): no keys of its own; local training must be SGD
    (with momentum < 1 or without), whose steps FedNova's normalisation ||a_i||_1 counts."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if self.optimizer != "sgd":
            raise FedsimError(
                f"config key '{where}.optimizer': fednova normalises local SGD steps; set optimizer: sgd"
            )
        if not self.momentum < 1:
            raise FedsimError(f"config key '{where}.momentum' must be < 1 for fednova (got {self.momentum})")


class FedMAConfig(RunConfig):
    """FedMA run. ``rounds`` counts FedMA rounds (each N communication rounds for N layers).

    sigma2, sigma0_2, gamma, iterations: BBP-MAP hyper-parameters (docs/algorithms.md section 2;
    authors' defaults 1, 1, 7, 5; Shakespeare uses gamma 1e-3). ``retrain_epochs``: epochs of the
    layer-wise retraining (default: ``local_epochs``). ``momentum`` defaults to the paper's 0.9.
    ``weight_decay`` applies to the whole-model local training that starts each FedMA round; the
    layer-wise retraining uses none.

    Protocol options (docs/algorithms.md section 4; each default is the authors' code):

    * ``classifier_retrain``: how clients retrain when only the classifier is left. ``appendix_a``:
      lr / 10, weight decay 1e-4, 3x the retrain epochs (paper App. A; IBM/FedMA main.py,
      local_retrain, for every CNN); ``plain``: the run's lr, weight decay 1e-4, the retrain epochs
      (IBM/FedMA language_modeling/lstm_fedma_with_comm.py, the LSTM's decoder); ``auto``:
      ``plain`` for a model with an LSTM layer, else ``appendix_a``.
    * ``lstm_estimate``: the global embedding and LSTM input-to-hidden neurons are the ``mean`` of
      the matched clients' (authors' LSTM code) or the prior-shrunk ``map`` estimate that every
      other layer kind uses.
    * ``growth_budget``: the authors' cap on a matched layer's growth, new neurons offered per
      client min(L_j, max(budget - L, 1)) (their code: 700); null: no cap.
    * ``match_outgoing``: match the last hidden layer's neurons with their classifier weights
      appended to the atom (PFNM's authors' code); FedMA's authors' code matches incoming weights
      only (false).
    * ``prior_mean_order``: ``paper`` puts the bias prior mean 0.1 on each layer's bias;
      ``authors`` reproduces IBM/FedMA's CNN code, which builds every later layer's atoms as
      [weights, bias] but its prior-mean vector as [bias, weights] (matching/pfnm.py,
      layer_wise_group_descent, lines 880-888 and 904-918; the first layer, lines 850-854, is right).
    """

    every_client: ClassVar[bool] = True
    rounds: int = 1
    """FedMA rounds; each takes one communication round per layer of the model."""
    momentum: float = 0.9
    """Client SGD momentum (the paper's 0.9)."""
    sigma2: float = 1.0
    """BBP-MAP: variance of a client's neuron around its global neuron (> 0)."""
    sigma0_2: float = 1.0
    """BBP-MAP: prior variance of a global neuron (> 0)."""
    gamma: float = 7.0
    """BBP-MAP: Indian-buffet-process mass; larger opens new global neurons more readily (> 0)."""
    iterations: int = 5
    """BBP-MAP refinement sweeps over the clients (>= 0; 0: one greedy pass)."""
    retrain_epochs: int | None = None
    """Epochs of the layer-wise retraining; null: ``local_epochs``."""
    retrain_lr: float | None = Field(
        None,
        exclude_if=lambda v: v is None,  # a run without it dumps (config_json) as before
        description="learning rate of the layer-wise retraining (> 0; the classifier rule appendix_a "
        "uses a tenth of it); null: lr. The authors' --retrain_lr (IBM/FedMA main.py:54, used at "
        ":656 and :658); every script of theirs sets it equal to --lr",
    )
    max_global_neurons: int | None = None
    """Hard cap on a matched layer's global neurons (>= the largest client layer); null: no cap."""
    growth_budget: int | None = None
    """Soft cap on a matched layer's growth, the authors' rule (their code: 700); null: none."""
    classifier_retrain: Literal["auto", "appendix_a", "plain"] = "auto"
    """How clients retrain when only the classifier is left (see the class description above)."""
    lstm_estimate: Literal["mean", "map"] = "mean"
    """Global embedding and LSTM input neurons: mean of the matched clients' or the MAP estimate."""
    match_outgoing: bool = False
    """Match the last hidden layer with its classifier weights appended (PFNM's code)."""
    prior_mean_order: Literal["paper", "authors"] = "paper"
    """Where a matched CNN or linear layer's 0.1 bias prior mean sits: ``paper``: on the bias
    coordinate of every layer; ``authors``: as IBM/FedMA's code, on the first matched layer's bias
    but on the FIRST WEIGHT coordinate of every later layer (docs/algorithms.md section 4)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        for key in ("sigma2", "sigma0_2", "gamma"):
            if not getattr(self, key) > 0:
                raise FedsimError(f"config key '{where}.{key}' must be > 0 (got {getattr(self, key)})")
        if self.iterations < 0:
            raise FedsimError(f"config key '{where}.iterations' must be >= 0 (got {self.iterations})")
        if self.retrain_lr is not None and not self.retrain_lr > 0:
            raise FedsimError(
                f"config key '{where}.retrain_lr' must be > 0 or null (null: the run's lr; got {self.retrain_lr})"
            )
        if self.growth_budget is not None and self.growth_budget < 1:
            raise FedsimError(
                f"config key '{where}.growth_budget' must be >= 1 or null (got {self.growth_budget}); "
                "the authors use 700"
            )
        if (
            experiment.data.num_clients is not None
            and experiment.engine.clients_per_round != experiment.data.num_clients
        ):
            raise FedsimError(
                f"{self.algorithm} matches every client's model: set engine.clients_per_round to "
                f"data.num_clients ({experiment.data.num_clients})"
            )
        e = experiment.engine
        if e.round_timeout_s is not None and e.timeout_policy == "drop":
            raise FedsimError(
                f"{self.algorithm} matches every client's model in every round of a pass, so no client "
                "may be dropped: set engine.timeout_policy to wait or fail, or engine.round_timeout_s "
                "to null"
            )


class PFNMConfig(FedMAConfig):
    """PFNM one-shot run: a single communication round (``rounds`` must stay 1). Local training
    uses momentum 0.9 as the authors' (IBM/FedMA main.py, train_net), and the last hidden layer is
    matched with its classifier weights (``match_outgoing``, PFNM's authors' code; see
    docs/algorithms.md section 4 for why)."""

    match_outgoing: bool = True
    """Match the last hidden layer with its classifier weights appended (PFNM's code)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        super().check(where, experiment)
        if self.rounds != 1:
            raise FedsimError(
                f"config key '{where}.rounds': pfnm is one-shot, set rounds: 1 (got {self.rounds})"
            )


class OneShotConfig(RunConfig):
    """A one-shot baseline: ``rounds`` must stay 1; local training uses momentum 0.9 as the
    FedMA authors' (IBM/FedMA main.py, train_net)."""

    every_client: ClassVar[bool] = True
    rounds: int = 1
    """Must stay 1: one round."""
    momentum: float = 0.9
    """Client SGD momentum (the FedMA authors' 0.9)."""

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        if self.rounds != 1:
            raise FedsimError(
                f"config key '{where}.rounds': {self.algorithm} is one-shot, set rounds: 1 "
                f"(got {self.rounds})"
            )


class PooledConfig(RunConfig):
    """The entire-data baseline: one model trained on every client's examples pooled. Nothing
    crosses a wire, so a run with a ``system:`` section logs no simulated time for it."""

    every_client: ClassVar[bool] = True


ASYNC_OBJECTIVES = ("fedavg", "fedprox", "moon")
"""Local objectives an asynchronous run's clients may train."""

SYNCHRONOUS_ONLY = {
    "fedma": "FedMA matches every client's model layer by layer in lockstep",
    "pfnm": "PFNM matches every client's model at once",
    "fedpart": "FedPart trains one layer group per round on a schedule every client shares",
    "scaffold": "SCAFFOLD's control variates assume every update starts from the current global model",
}
"""Algorithms that need synchronous rounds, and why (what an asynchronous run names them with)."""


class AsyncConfig(RunConfig):
    """An asynchronous run (FedBuff, FedAsync; docs/asynchronous.md):
    ``concurrency`` clients train at all times on the virtual clock, each from the model version
    it downloaded; ``rounds`` counts server steps. A client's update is weighted by a function
    s of its staleness tau (server steps since its download; Xie et al. 2019): ``constant`` 1,
    ``polynomial`` (tau + 1)^-a, ``hinge`` 1 if tau <= b else 1 / (a (tau - b) + 1). Updates staler
    than ``max_staleness`` are discarded (and logged). The clients train the local objective of
    FedAvg, FedProx or MOON (``mu``: FedProx's proximal or MOON's contrastive coefficient,
    defaults 0.001 and 5; ``tau``: MOON's temperature)."""

    rounds: int = Field(20, description="server steps")
    concurrency: int = Field(10, description="C, clients training at any simulated time")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial", description="s(tau): constant, polynomial (tau + 1)^-a, or hinge (a, b)"
    )
    staleness_a: float = Field(0.5, description="a of the polynomial and hinge staleness functions (>= 0)")
    staleness_b: float = Field(4.0, description="b of the hinge staleness function (>= 0)")
    max_staleness: int | None = Field(
        None, description="updates with a larger staleness are discarded; null: none are"
    )
    eval_every_s: float | None = Field(
        None,
        description="evaluate the global model whenever a server step crosses a multiple of this many "
        "simulated seconds (instead of every engine.eval_every steps); null: by steps",
    )
    local_objective: str = Field(
        "fedavg", description="the clients' local objective: fedavg, fedprox or moon"
    )
    mu: float | None = Field(
        None,
        description="FedProx's proximal or MOON's contrastive coefficient; null: 0.001 (fedprox) or 5 (moon)",
    )
    tau: float = Field(0.5, description="MOON's temperature (local_objective: moon)")

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        obj = self.local_objective
        if obj in SYNCHRONOUS_ONLY:
            raise FedsimError(
                f"config key '{where}.local_objective': {obj} cannot run asynchronously: "
                f"{SYNCHRONOUS_ONLY[obj]}; use fedavg, fedprox or moon"
            )
        if obj not in ASYNC_OBJECTIVES:
            raise FedsimError(
                f"config key '{where}.local_objective' is {obj!r}; choose one of {', '.join(ASYNC_OBJECTIVES)}"
            )
        if self.concurrency < 1:
            raise FedsimError(f"config key '{where}.concurrency' must be >= 1 (got {self.concurrency})")
        if experiment.data.num_clients is not None and self.concurrency > experiment.data.num_clients:
            raise FedsimError(
                f"config key '{where}.concurrency' ({self.concurrency}) is larger than data.num_clients "
                f"({experiment.data.num_clients}); a client trains one update at a time"
            )
        if not self.staleness_a >= 0 or not self.staleness_b >= 0:
            raise FedsimError(f"config keys '{where}.staleness_a' and '{where}.staleness_b' must be >= 0")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise FedsimError(
                f"config key '{where}.max_staleness' must be >= 0 or null (got {self.max_staleness})"
            )
        if self.eval_every_s is not None and not self.eval_every_s > 0:
            raise FedsimError(f"config key '{where}.eval_every_s' must be > 0 simulated seconds or null")
        if self.mu is not None and self.mu < 0:
            raise FedsimError(f"config key '{where}.mu' must be >= 0 (got {self.mu})")
        rule = experiment.round_rule(self)
        if rule is not None and rule.mode != "sync":
            raise FedsimError(
                f"run {self.label!r}: {self.algorithm} is asynchronous, so system mode {rule.mode!r} (a rule for "
                "synchronous rounds) does not apply; give the run 'system: {mode: sync}'"
            )
        if experiment.engine.round_timeout_s is not None:
            raise FedsimError(
                f"run {self.label!r}: {self.algorithm} is asynchronous and times clients on the virtual clock; "
                "set engine.round_timeout_s to null"
            )


class FedBuffConfig(AsyncConfig):
    """FedBuff run (Nguyen et al., AISTATS 2022, Algorithm 1): the server adds s(tau) x Delta_k of
    each arriving update to a buffer, and after ``buffer_size`` (K) updates divides it by K (or,
    with ``weighting: examples``, by the updates' example counts) and applies a server optimiser
    step to it: ``sgd`` (``server_lr``, ``server_momentum``) or FedAdam, FedYogi, FedAdagrad's rules
    (``server_lr``, ``beta1``, ``beta2``, ``epsilon``; Reddi et al. 2021, Algorithm 2)."""

    buffer_size: int = Field(10, description="K, updates per server step")
    allow_buffer_above_concurrency: bool = Field(
        False,
        description="accept buffer_size > concurrency (a step then waits for updates of later dispatches)",
    )
    server_optimizer: Literal["sgd", "adam", "yogi", "adagrad"] = Field(
        "sgd", description="the server step on the buffered pseudo-gradient"
    )
    server_lr: float = Field(1.0, description="server learning rate (> 0)")
    server_momentum: float = Field(0.0, description="sgd: server momentum, in [0, 1)")
    beta1: float = Field(0.9, description="adam, yogi, adagrad: first-moment decay, in [0, 1)")
    beta2: float = Field(0.99, description="adam, yogi: second-moment decay, in [0, 1)")
    epsilon: float = Field(1e-3, description="adam, yogi, adagrad: the adaptivity constant tau (> 0)")
    weighting: Literal["uniform", "examples"] = Field(
        "uniform", description="each update's weight in the buffer: 1 (the paper's 1/K) or its example count"
    )

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        super().check(where, experiment)
        if self.buffer_size < 1:
            raise FedsimError(f"config key '{where}.buffer_size' must be >= 1 (got {self.buffer_size})")
        if self.buffer_size > self.concurrency and not self.allow_buffer_above_concurrency:
            raise FedsimError(
                f"config key '{where}.buffer_size' ({self.buffer_size}) is larger than concurrency "
                f"({self.concurrency}); lower it, or set allow_buffer_above_concurrency: true"
            )
        if not self.server_lr > 0 or not self.epsilon > 0:
            raise FedsimError(f"config keys '{where}.server_lr' and '{where}.epsilon' must be > 0")
        for key in ("server_momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise FedsimError(f"config key '{where}.{key}' must be in [0, 1) (got {getattr(self, key)})")


class FedAsyncConfig(AsyncConfig):
    """FedAsync run (Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019): every
    arriving update is a server step x <- (1 - alpha_t) x + alpha_t x_new with alpha_t =
    ``alpha`` x s(tau). The clients' local objective is the paper's proximal one, FedProx's term
    (``rho`` / 2) ||x_new - x_tau||^2 around the downloaded model (``local_objective: fedprox``,
    the default; ``rho`` is its coefficient)."""

    concurrency: int = Field(10, description="C, clients training at any simulated time")
    alpha: float = Field(0.6, description="the mixing weight alpha, in (0, 1]")
    rho: float = Field(0.01, description="the proximal coefficient rho of the local objective (>= 0)")
    local_objective: str = Field(
        "fedprox", description="the clients' local objective: fedprox (rho), fedavg or moon"
    )

    def check(self, where: str, experiment: ExperimentConfig) -> None:
        super().check(where, experiment)
        if not 0 < self.alpha <= 1:
            raise FedsimError(f"config key '{where}.alpha' must be in (0, 1] (got {self.alpha})")
        if not self.rho >= 0:
            raise FedsimError(f"config key '{where}.rho' must be >= 0 (got {self.rho})")
        if self.mu is not None and self.local_objective == "fedprox":
            raise FedsimError(
                f"config key '{where}.mu': fedasync's proximal coefficient is rho; remove mu and set rho"
            )


class SweepConfig(_Strict):
    """``sweep:`` section, read by ``fedsim sweep`` (:mod:`fedsim.sweep`; ``fedsim run`` runs the
    experiment without it). ``grid`` maps a key path as ``--set`` takes it (``runs.0.lr``) to the
    values to try; each combination is one trial, run once per seed of ``seeds`` (default: the
    experiment's ``seed``); ``max_concurrent`` caps the trials running at once (default: as many
    as the cluster fits). Range checks: :func:`fedsim.sweep.plan`."""

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Key path as ``--set`` takes it (``runs.0.lr``) -> the values to try; one trial per combination."""
    seeds: list[int] | None = None
    """Seeds each combination runs with; null: the experiment's ``seed``."""
    max_concurrent: int | None = None
    """Trials running at once; null: as many as the cluster fits."""


class ExperimentConfig(_Strict):
    """A whole experiment file, resolved (defaults filled in)."""

    name: str = "digits"
    """Experiment name; the run directory is ``<output_dir>/<name>-<timestamp>/``."""
    seed: int = 0
    """Root of every random stream: (seed, stream, round, client)."""
    output_dir: str = "runs"
    """Where run directories go: a path or a URI such as ``s3://bucket/prefix`` (``--out`` overrides)."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    system: SystemConfig | None = None
    """The simulated devices, availability and round rule (docs/heterogeneity.md); null: an
    ideal federation without simulated time."""
    runs: tuple[RunConfig, ...] = ()
    sweep: SweepConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict with every run's algorithm-specific keys (``sweep`` and
        ``system``, the experiment's and a run's, only when set, so an experiment without them
        writes what it did before they existed)."""
        skip = {"runs"} | ({"sweep"} if self.sweep is None else set())
        d = self.model_dump(mode="json", exclude=skip | ({"system"} if self.system is None else set()))
        d["runs"] = [r.to_dict() for r in self.runs]
        return d

    def round_rule(self, run: RunConfig) -> RoundRule | None:
        """The round rule of ``run``: its own ``system:``, else the experiment's, else None (no
        ``system:`` section: no simulated time)."""
        if self.system is None:
            return None
        return run.system if run.system is not None else self.system

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


DEFAULT_EXPERIMENT: dict[str, Any] = {
    "name": "digits",
    "seed": 0,
    "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 10},
    "model": {"name": "digits_cnn"},
    "engine": {"backend": "ray", "clients_per_round": 10},
    "runs": [
        {"algorithm": "fedavg", "rounds": 26, "local_epochs": 2, "lr": 0.05, "batch_size": 16},
        {"algorithm": "fedprox", "rounds": 26, "local_epochs": 2, "lr": 0.05, "batch_size": 16, "mu": 0.01},
        {
            "algorithm": "fedpart",
            "optimizer": "sgd",
            "lr": 0.05,
            "local_epochs": 2,
            "batch_size": 16,
            "warmup_rounds": 5,
            "rounds_per_group": 2,
            "cycles": 2,
        },
        {
            "algorithm": "fedma",
            "rounds": 3,
            "local_epochs": 2,
            "retrain_epochs": 2,
            "lr": 0.05,
            "batch_size": 16,
        },
    ],
}
"""The built-in experiment (``fedsim run`` with no file; the same as jobs/digits.yaml): FedAvg,
FedProx, FedPart and FedMA side by side on the same 10 Dirichlet(0.5) digits clients."""


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts union-member tags such as "literal['auto']" in locations: drop them.
    parts = [str(p) for p in loc if isinstance(p, int) or re.fullmatch(r"[A-Za-z_][\w]*", str(p))]
    return ".".join(parts)


def _unknown_key(key: str) -> FedsimError:
    return FedsimError(
        f"unknown config key '{key}'; remove it or check its spelling (see docs/configuration.md)"
    )


def _raise_from(err: ValidationError, prefix: str, raw: Any) -> None:
    e = err.errors()[0]
    key = ".".join(p for p in (prefix, _loc(e["loc"])) if p)
    if e["type"] == "extra_forbidden":
        raise _unknown_key(key) from None
    got = e.get("input")
    shown = json.dumps(got) if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    raise FedsimError(
        f"config key '{key}': {e['msg'].rstrip('.')} (got {shown}); fix it in the YAML file or with --set"
    ) from None


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does: PyYAML follows YAML 1.1, where a
    number in exponent form without a dot (``1e-3``, ``5e4``) is a string."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str | bytes) -> Any:
    """The value of a YAML document (an experiment file or a ``--set`` value), safe-loaded, with
    ``1e-3`` read as the float 0.001.

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_YamlLoader)


def _check_mapping(x: Any, what: str) -> dict[str, Any]:
    if not isinstance(x, dict):
        raise FedsimError(
            f"{what} must be a YAML mapping of keys to values (got {type(x).__name__}); "
            "see jobs/digits.yaml for the layout"
        )
    return x


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config dict.

    ``runs.0.rounds=3`` indexes lists by position. Returns a new dict.

    Raises:
        FedsimError: an override is not ``key=value``, or indexes past a list's end.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise FedsimError(f"--set expects key=value (got {item!r}); e.g. --set data.num_clients=50")
        path, _, text = item.partition("=")
        value = load_yaml(text) if text.strip() else None
        keys = path.strip().split(".")
        node: Any = raw
        for i, k in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise FedsimError(
                        f"--set {path}: '{'.'.join(keys[:i])}' has {len(node)} entries; "
                        f"use an index from 0 to {len(node) - 1}"
                    )
                k = int(k)
            elif not isinstance(node, dict):
                raise FedsimError(
                    f"--set {path}: '{'.'.join(keys[:i])}' is not a section; check the key path"
                )
            if last:
                node[k] = value
            else:
                if isinstance(node, dict) and k not in node:
                    node[k] = {}
                node = node[k]
    return raw


RUN_CONFIGS: dict[str, type[RunConfig]] = {
    "fedavg": FullNetworkConfig,
    "fedprox": FedProxConfig,
    "moon": MoonConfig,
    "fedpart": FedPartConfig,
    "fedma": FedMAConfig,
    "pfnm": PFNMConfig,
    "ensemble": OneShotConfig,
    "local": OneShotConfig,
    "entire_data": PooledConfig,
    "fedavgm": FedAvgMConfig,
    "fedadam": FedAdamConfig,
    "fedyogi": FedAdamConfig,
    "fedadagrad": FedAdagradConfig,
    "scaffold": ScaffoldConfig,
    "fednova": FedNovaConfig,
    "fedbuff": FedBuffConfig,
    "fedasync": FedAsyncConfig,
}
"""``algorithm:`` name -> its run-config class (each algorithm's ``Config`` in
:data:`fedsim.algorithms.ALGORITHMS`)."""


def run_configs() -> dict[str, type[RunConfig]]:
    """``algorithm:`` name -> run-config class for every registered algorithm: :data:`RUN_CONFIGS`
    plus the ``Config`` of any algorithm registered outside it (imports :mod:`fedsim.algorithms`,
    hence torch; :func:`parse` calls it only for a name :data:`RUN_CONFIGS` lacks)."""
    from fedsim.algorithms import ALGORITHMS

    return {**RUN_CONFIGS, **{name: cls.Config for name, cls in ALGORITHMS.items()}}


def parse(raw: Any, overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate a raw experiment mapping into an :class:`ExperimentConfig`.

    Raises:
        FedsimError: not a mapping, unknown key, wrong type, unknown algorithm, no runs,
            duplicate run names, or a value out of range; the message names the key.
    """
    raw = _check_mapping(raw, "the experiment file")
    raw = apply_overrides(raw, overrides or [])
    unknown = [k for k in raw if k not in ExperimentConfig.model_fields]
    if unknown:  # before the runs check: a misspelt 'runs' is an unknown key, not a missing list
        raise _unknown_key(str(unknown[0]))
    runs_raw = raw.get("runs")
    if runs_raw is None or (isinstance(runs_raw, list) and not runs_raw):
        raise FedsimError(
            "the experiment has no runs; add a 'runs:' list such as [{algorithm: fedavg, rounds: 20}]"
        )
    if not isinstance(runs_raw, list):
        raise FedsimError(f"config key 'runs' must be a list of run mappings (got {type(runs_raw).__name__})")
    try:
        top = ExperimentConfig.model_validate({k: v for k, v in raw.items() if k != "runs"})
    except ValidationError as err:
        _raise_from(err, "", raw)
    runs = []
    for i, r in enumerate(runs_raw):
        r = _check_mapping(r, f"runs.{i}")
        algo = r.get("algorithm")
        configs = RUN_CONFIGS if algo in RUN_CONFIGS else run_configs()
        if algo not in configs:
            raise FedsimError(
                f"config key 'runs.{i}.algorithm': unknown algorithm {algo!r}; "
                f"choose one of {', '.join(sorted(configs))}"
            )
        try:
            runs.append(configs[algo].model_validate(r))
        except ValidationError as err:
            _raise_from(err, f"runs.{i}", r)
    cfg = top.model_copy(update={"runs": tuple(runs)})
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Range checks that need more than one key (types are checked by pydantic).

    Raises:
        FedsimError: the first problem found, naming the key and the fix.
    """
    d, e = cfg.data, cfg.engine
    _check_name(cfg.name, "name")
    if cfg.seed < 0:
        raise FedsimError(f"config key 'seed' must be >= 0 (got {cfg.seed}); use a non-negative integer")
    if d.partition in ("dirichlet", "hetero_dir") and not d.alpha > 0:
        raise FedsimError(
            f"data.alpha must be > 0 (got {d.alpha}); use a positive Dirichlet alpha such as 0.5"
        )
    if d.num_clients is None and d.partition not in ("natural", "grouped_natural"):
        raise FedsimError(
            f"data.num_clients is null, which only data.partition natural and grouped_natural allow "
            f"(got {d.partition!r}); "
            "set data.num_clients to a count"
        )
    if d.num_clients is not None and d.num_clients < 1:
        raise FedsimError(f"data.num_clients must be >= 1 (got {d.num_clients})")
    if not 0 < d.train_fraction < 1:
        raise FedsimError(f"data.train_fraction must be between 0 and 1 (got {d.train_fraction})")
    _validate_data_options(d)
    if e.clients_per_round < 1:
        raise FedsimError(f"engine.clients_per_round must be >= 1 (got {e.clients_per_round})")
    if d.num_clients is not None and e.clients_per_round > d.num_clients:
        raise FedsimError(
            f"engine.clients_per_round ({e.clients_per_round}) is larger than data.num_clients "
            f"({d.num_clients}); lower clients_per_round or add clients"
        )
    if e.num_workers != "auto" and e.num_workers < 1:
        raise FedsimError(f"engine.num_workers must be 'auto' or >= 1 (got {e.num_workers})")
    if not e.cpus_per_worker > 0:
        raise FedsimError(f"engine.cpus_per_worker must be > 0 (got {e.cpus_per_worker})")
    if e.gpus_per_worker < 0:
        raise FedsimError(f"engine.gpus_per_worker must be >= 0 (got {e.gpus_per_worker})")
    if e.gpus_per_worker > 1 and e.gpus_per_worker != int(e.gpus_per_worker):
        raise FedsimError(f"engine.gpus_per_worker above 1 must be a whole number (got {e.gpus_per_worker})")
    if e.eval_every < 1:
        raise FedsimError(f"engine.eval_every must be >= 1 (got {e.eval_every})")
    if e.eval_batch_size < 1:
        raise FedsimError(f"engine.eval_batch_size must be >= 1 examples (got {e.eval_batch_size})")
    if e.max_attempts < 1:
        raise FedsimError(f"engine.max_attempts must be >= 1 (got {e.max_attempts})")
    if e.round_timeout_s is not None and not e.round_timeout_s > 0:
        raise FedsimError(f"engine.round_timeout_s must be > 0 seconds or null (got {e.round_timeout_s})")
    if e.checkpoint_every < 1:
        raise FedsimError(f"engine.checkpoint_every must be >= 1 (got {e.checkpoint_every})")
    if e.vectorize_max_clients < 1:
        raise FedsimError(f"engine.vectorize_max_clients must be >= 1 (got {e.vectorize_max_clients})")
    for key, amount in (e.worker_resources or {}).items():
        if key in ("CPU", "GPU") or not amount > 0:
            raise FedsimError(
                f"engine.worker_resources.{key} must be a custom resource with an amount > 0 "
                f"(got {amount}); use engine.cpus_per_worker / gpus_per_worker for CPU and GPU"
            )
    if cfg.system is not None:
        _check_system(cfg.system)
    for i, r in enumerate(cfg.runs):
        if r.system is not None and cfg.system is None:
            raise FedsimError(
                f"config key 'runs.{i}.system' sets a round rule, but the experiment has no 'system:' "
                "section of devices; add one (system: {} gives identical, always-online devices)"
            )
        if r.system is not None:
            _check_rule(r.system, f"runs.{i}.system")
        wire = [k for k in ("uplink", "downlink", "secure_aggregation") if getattr(r, k, None) is not None]
        if isinstance(r, AsyncConfig) and wire:
            raise FedsimError(
                f"config key 'runs.{i}.{wire[0]}': asynchronous runs do not take codecs or secure "
                f"aggregation yet (each update would be decoded against the model version it "
                f"trained from); remove {wire[0]} or use a synchronous algorithm"
            )
        rule = cfg.round_rule(r)
        if rule is not None and r.every_client and rule.mode != "sync":
            raise FedsimError(
                f"run {r.label!r}: {r.algorithm} needs every client in every round, so it cannot drop or "
                f"leave out clients under system mode {rule.mode!r}; give the run 'system: {{mode: sync}}'"
            )
    labels = [r.label for r in cfg.runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise FedsimError(f"two runs are both named {dup[0]!r}; give each run a distinct 'name:'")
    for i, r in enumerate(cfg.runs):
        for key in ("rounds", "local_epochs", "batch_size"):
            if getattr(r, key) is not None and getattr(r, key) < 1:
                raise FedsimError(f"config key 'runs.{i}.{key}' must be >= 1 (got {getattr(r, key)})")
        if not r.lr > 0:
            raise FedsimError(f"config key 'runs.{i}.lr' must be > 0 (got {r.lr})")
        for key in ("momentum", "weight_decay"):
            if not getattr(r, key) >= 0:
                raise FedsimError(f"config key 'runs.{i}.{key}' must be >= 0 (got {getattr(r, key)})")
        if isinstance(r, FullNetworkConfig) and r.independent_weight_decay is not None:
            if not r.independent_weight_decay >= 0:
                raise FedsimError(
                    f"config key 'runs.{i}.independent_weight_decay' must be >= 0 (got {r.independent_weight_decay})"
                )
            if r.init != "independent":
                raise FedsimError(
                    f"config key 'runs.{i}.independent_weight_decay' applies only with init: independent; "
                    f"set runs.{i}.init: independent or remove it"
                )
        if r.name is not None:
            _check_name(r.name, f"runs.{i}.name")
        if r.uplink is not None:
            r.uplink.check(f"runs.{i}.uplink", r.algorithm)
        if r.downlink is not None:
            r.downlink.check_downlink(f"runs.{i}.downlink", r.algorithm)
        if r.secure_aggregation is not None:
            r.secure_aggregation.check(f"runs.{i}.secure_aggregation", r.algorithm, r.uplink)
        r.check(f"runs.{i}", cfg)


_QUANTITIES = {
    "compute_macs_per_s": "multiply-accumulates per second",
    "uplink_bytes_per_s": "bytes per second",
    "downlink_bytes_per_s": "bytes per second",
    "latency_s": "seconds",
}


def _check_distribution(d: float | Distribution, key: str) -> None:  # a tier's quantities are floats
    """A device quantity's distribution: positive values (a latency may be 0).

    Raises:
        FedsimError: a missing parameter or a value out of range, naming ``key``.
    """
    floor_ok = key.endswith("latency_s")  # a latency of 0 is allowed, a speed of 0 is not
    unit = _QUANTITIES[key.rsplit(".", 1)[-1]]

    def positive(x: float | None, what: str) -> None:
        if x is None:
            raise FedsimError(f"config key '{key}.{what}' is required for this distribution ({unit})")
        if not (x >= 0 if floor_ok else x > 0) or x != x or x == float("inf"):
            raise FedsimError(
                f"config key '{key}{'.' + what if what else ''}' must be {'>= 0' if floor_ok else '> 0'} "
                f"{unit} (got {x}); device speeds and bandwidths are positive"
            )

    if not isinstance(d, Distribution):
        positive(d, "")
        return
    if d.distribution == "constant":
        positive(d.value, "value")
    elif d.distribution == "lognormal":
        if d.median is None or not d.median > 0:
            raise FedsimError(
                f"config key '{key}.median' must be > 0 {unit} for a lognormal (got {d.median})"
            )
        if not d.sigma >= 0:
            raise FedsimError(f"config key '{key}.sigma' must be >= 0 (got {d.sigma})")
    else:
        positive(d.low, "low")
        positive(d.high, "high")
        if d.high < d.low:
            raise FedsimError(f"config key '{key}': uniform needs low <= high (got {d.low} > {d.high})")


def _check_rule(rule: RoundRule, key: str) -> None:
    """A round rule's keys fit its mode.

    Raises:
        FedsimError: a deadline mode without a positive ``deadline_s``, a key that does not
            apply to the mode, or ``overselect`` below 1.
    """
    if rule.mode == "deadline":
        if rule.deadline_s is None or not rule.deadline_s > 0:
            raise FedsimError(
                f"config key '{key}.deadline_s' must be > 0 simulated seconds with mode deadline "
                f"(got {rule.deadline_s})"
            )
    elif rule.deadline_s is not None or rule.partial_work:
        raise FedsimError(
            f"config keys '{key}.deadline_s' and '{key}.partial_work' apply only to mode deadline "
            f"(mode is {rule.mode!r}); remove them or set mode: deadline"
        )
    if not rule.overselect >= 1 or rule.overselect != rule.overselect:
        raise FedsimError(f"config key '{key}.overselect' must be >= 1 (got {rule.overselect})")


def _check_system(sysc: SystemConfig) -> None:
    """The ``system:`` section's ranges (files are checked when they are read).

    Raises:
        FedsimError: the first bad key, named with its fix.
    """
    _check_rule(sysc, "system")
    dev = sysc.devices
    sources = [k for k in ("tiers", "trace") if getattr(dev, k) is not None]
    chosen = sorted(set(dev.model_fields_set) & set(_QUANTITIES))
    if len(sources) > 1 or (sources and chosen):
        both = sources + chosen
        raise FedsimError(
            f"config keys 'system.devices.{both[0]}' and 'system.devices.{both[1]}' are two sources of "
            "devices; keep one (distributions, tiers or a trace)"
        )
    for q in _QUANTITIES:
        _check_distribution(getattr(dev, q), f"system.devices.{q}")
    if dev.tiers is not None:
        if not dev.tiers:
            raise FedsimError(
                "config key 'system.devices.tiers' is empty; list at least one tier or remove it"
            )
        names = [t.name for t in dev.tiers]
        if len(set(names)) != len(names):
            raise FedsimError(
                "config key 'system.devices.tiers': two tiers share a name; name each tier once"
            )
        for i, t in enumerate(dev.tiers):
            if not 0 < t.fraction <= 1:
                raise FedsimError(
                    f"config key 'system.devices.tiers.{i}.fraction' must be in (0, 1] (got {t.fraction})"
                )
            for q in _QUANTITIES:
                _check_distribution(getattr(t, q), f"system.devices.tiers.{i}.{q}")
        total = sum(t.fraction for t in dev.tiers)
        if abs(total - 1) > 1e-9:
            raise FedsimError(
                f"config key 'system.devices.tiers': the fractions sum to {total:g}; make them sum to 1"
            )
    av = sysc.availability
    if av.kind == "daily":
        if not 0 < av.on_fraction <= 1:
            raise FedsimError(
                f"config key 'system.availability.on_fraction' must be in (0, 1] (got {av.on_fraction})"
            )
        if not av.period_s > 0:
            raise FedsimError(
                f"config key 'system.availability.period_s' must be > 0 simulated seconds (got {av.period_s})"
            )
    if (av.kind == "trace") != (av.trace is not None):
        raise FedsimError(
            "config keys 'system.availability.kind' and 'system.availability.trace' go together: "
            "kind: trace needs a trace file, and a trace file needs kind: trace"
        )
    if sysc.server_macs_per_s is not None and not sysc.server_macs_per_s > 0:
        raise FedsimError(
            f"config key 'system.server_macs_per_s' must be > 0 multiply-accumulates per second or null "
            f"(got {sysc.server_macs_per_s})"
        )


def _validate_data_options(d: DataConfig) -> None:
    """Checks of the ``data:`` keys that only some datasets and partitions read.

    Raises:
        FedsimError: the first problem found, naming the key and the fix.
    """
    if d.min_partition_size < 0:
        raise FedsimError(f"data.min_partition_size must be >= 0 (got {d.min_partition_size})")
    for key in ("shards_per_client", "shard_size", "classes_per_client"):
        value = getattr(d, key)
        if value is not None and value < 1:
            raise FedsimError(f"data.{key} must be >= 1 or null (got {value})")
    if d.partition == "flwr_dirichlet" and not d.alpha > 0:
        raise FedsimError(
            f"data.alpha must be > 0 (got {d.alpha}); use a positive Dirichlet alpha such as 0.5"
        )
    if d.partition == "shard":
        if d.shards_per_client is None and d.shard_size is None:
            raise FedsimError(
                "data.partition=shard needs data.shards_per_client or data.shard_size; set e.g. "
                "data.shards_per_client: 2 (McMahan et al.'s two shards per client)"
            )
        if d.keep_incomplete_shard and d.shards_per_client is not None and d.shard_size is not None:
            raise FedsimError(
                "data.keep_incomplete_shard needs data.shards_per_client or data.shard_size null "
                "(with both set every shard is complete); unset one of them"
            )
    if d.partition == "pathological" and d.classes_per_client is None:
        raise FedsimError(
            "data.partition=pathological needs data.classes_per_client; set it, e.g. 2 (McMahan et al.)"
        )
    if d.partition == "power_law" and not d.power_law_exponent > 0:
        raise FedsimError(f"data.power_law_exponent must be > 0 (got {d.power_law_exponent}); use e.g. 1.5")
    capped = d.partition in ("iid", "dirichlet") or (
        d.partition == "natural" and d.dataset in ("shakespeare", "synthetic")
    )
    if d.examples_per_client is not None and not capped:
        raise FedsimError(
            f"data.examples_per_client works with partition iid, dirichlet, and natural on shakespeare "
            f"or synthetic (got {d.partition!r}); unset it"
        )
    if d.dataset == "hf" and not d.path:
        raise FedsimError(
            "data.dataset=hf needs data.path: a Hub name such as flwrlabs/femnist, or a local "
            "save_to_disk or Parquet directory"
        )
    if d.partition == "grouped_natural" and (d.group_size is None or d.group_size < 1):
        raise FedsimError(
            f"data.partition=grouped_natural needs data.group_size >= 1 (got {d.group_size}); set the "
            "number of natural ids per client"
        )
    if (
        d.partition in ("natural", "grouped_natural")
        and d.dataset not in ("shakespeare", "synthetic")
        and not d.partition_by
    ):
        raise FedsimError(
            f"data.partition={d.partition} on {d.dataset!r} needs data.partition_by, the column of client "
            "ids (e.g. writer_id)"
        )


def _check_name(name: str, key: str) -> None:
    """Names become file and directory names (``<output_dir>/<name>-<time>/``,
    ``checkpoints/<run>.pt``), so they may not be empty, hold a path separator or start with a dot.

    Raises:
        FedsimError: ``name`` could escape or misplace its directory.
    """
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise FedsimError(
            f"config key '{key}' is {name!r}; use a name without '/', '\\' or a leading '.', "
            "such as digits-fedavg"
        )


def load(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment from a YAML file, or the built-in default when ``path`` is None.

    Raises:
        FedsimError: the file is missing, unreadable, not YAML, or fails :func:`parse`.
    """
    if path is None:
        return parse(copy.deepcopy(DEFAULT_EXPERIMENT), overrides)
    p = Path(path)
    if not p.is_file():
        raise FedsimError(
            f"config file {str(p)!r} does not exist; pass the path of an experiment YAML "
            "such as jobs/digits.yaml"
        )
    try:
        raw = load_yaml(p.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise FedsimError(
            f"cannot read config file {str(p)!r} ({err.__class__.__name__}); check its "
            "permissions and encoding"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FedsimError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
    return parse(raw, overrides)
