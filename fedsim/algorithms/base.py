"""The algorithm contract: a few hooks on the engine's single round loop.

The engine owns the loop (sample cohort -> :meth:`Algorithm.plan_round` -> :meth:`Algorithm.downlink`
-> clients run :meth:`Algorithm.local_update` -> :meth:`Algorithm.aggregate` -> evaluate -> log).
The base class implements FedAvg (McMahan et al., 2017, Algorithm 1); other algorithms override the
hook that differs: FedProx only :meth:`Algorithm.batch_loss`, SCAFFOLD :meth:`Algorithm.before_step`,
FedPart the plan, FedMA the plan and the aggregation. Round plans and client results are frozen
dataclasses with typed fields; an algorithm's own server and client state are dataclasses too
(:class:`ServerState`, :class:`ClientState`). The dry run asks each algorithm what crosses the
wire (:meth:`Algorithm.traffic`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from fedsim import params as P
from fedsim.config import ExperimentConfig, RunConfig

if TYPE_CHECKING:
    from fedsim.models.base import FedModel

#: Names (last component of a state_dict key) of BatchNorm's running statistics and counter.
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class RoundPlan:
    """What every client of one communication round is asked to do.

    Attributes:
        round: 0-based communication round index.
        cohort: sampled client ids, ascending.
        phase: label logged in rounds.parquet (``"full"`` for whole-network rounds).
        layer: index of the layer or layer group a partial round works on, else None.
        trainable: state_dict keys clients train; None trains every parameter.
        upload: state_dict keys clients send back; None sends the whole state_dict.
        local_epochs: passes over the client's data.
        lr, momentum, weight_decay: optimiser settings for this round.
        evaluate: whether the global model after this round is complete and worth evaluating
            (False in the middle of FedMA's layer-wise pass).
        pooled: one task trains on the union of all clients' data and nothing crosses a wire
            (the entire-data baseline); its bytes are 0.
        own_init: every client starts from its own initialisation (:meth:`Algorithm.own_init`)
            instead of the server's model, the server sends nothing (0 downlink bytes), and the
            local loss is the plain cross-entropy: round 0 under ``init: independent``, the FedMA
            paper's baselines "without a shared initialisation" (App. A; IBM/FedMA main.py,
            ``local_train`` before ``averaged_weights``).
    """

    round: int
    cohort: tuple[int, ...]
    local_epochs: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    phase: str = "full"
    layer: int | None = None
    trainable: tuple[str, ...] | None = None
    upload: tuple[str, ...] | None = None
    evaluate: bool = True
    pooled: bool = False
    own_init: bool = False


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round. ``attempt`` counts retries after a worker failure;
    ``max_steps`` caps its local optimizer steps (the partial work that fits a round's deadline,
    :mod:`fedsim.system.clock`), None for the plan's full ``local_epochs``."""

    run_id: str
    round: int
    client_id: int
    plan: RoundPlan
    attempt: int = 0
    max_steps: int | None = None


@dataclass(frozen=True)
class ClientResult:
    """What a client sends back, plus the engine's accounting of it.

    Attributes:
        upload: the tensors the client uploads, name -> numpy array.
        n_examples: training examples the client holds (FedAvg's weight n_j).
        train_loss: mean cross-entropy over every example of every local epoch (nats).
        bytes_up / bytes_down: bytes the client sent / received this round (numel x element size).
        seconds: wall seconds of the client's local work on its worker.
        worker: id of the worker that ran it; attempt: 0 unless retried.
        state: the client's new persistent state (stateful algorithms only), else None.
        dropped: the client missed the round's deadline and was left out of the aggregation.
        macs: multiply-accumulates of its local training: examples x epochs x 3F (2F when only
            part of the model trains; + 2F for MOON's frozen forward passes), F the forward cost
            of the model it trained (thop's count).
        trainable_params: parameters its local training updated, counted on the model it trained
            (FedMA: its partly matched local model, not the global one).
        local_steps: optimizer steps (minibatches) its local training took, tau_i in FedNova
            (Wang et al., NeurIPS 2020) and K in SCAFFOLD (Karimireddy et al., ICML 2020); 0 for a
            dropped client; the ``local_steps`` column of clients.parquet.
        outcome: what the round did with it (:data:`fedsim.system.clock.OUTCOMES`): "aggregated",
            or why it was not.
        sim_dispatch_s / sim_arrival_s: simulated seconds at which it received the model and at
            which its upload arrives (or would have); None without a ``system:`` section.
        model_version / staleness: in an asynchronous run, the server step its model came from and
            the server steps taken between its download and its arrival; None in a synchronous one.
        bytes_up_raw / bytes_down_raw: what the same tensors take uncompressed (numel x element
            size) when a codec encoded them (:mod:`fedsim.wire`); None: nothing was compressed,
            the same as ``bytes_up`` / ``bytes_down``. ``upload`` then holds the encoded messages
            (name -> uint8 array) until the driver decodes them.
        bytes_secagg: the secure-aggregation protocol's share of bytes_up + bytes_down (0 without).
        residual_norm: ||e||_2 of the client's error-feedback residual after this round, or None.
        secagg_clipped / secagg_overflow: under secure aggregation, the update coordinates it
            clipped and the integer coordinates that do not fit the fixed-point range; else None.
    """

    client_id: int
    round: int
    upload: dict[str, Any]
    n_examples: int
    train_loss: float
    bytes_up: int
    bytes_down: int
    seconds: float
    worker: str = ""
    attempt: int = 0
    state: Any = None
    dropped: bool = False
    macs: int = 0
    trainable_params: int = 0
    local_steps: int = 0
    outcome: str = "aggregated"
    sim_dispatch_s: float | None = None
    sim_arrival_s: float | None = None
    model_version: int | None = None
    staleness: int | None = None
    bytes_up_raw: int | None = None
    bytes_down_raw: int | None = None
    bytes_secagg: int = 0
    residual_norm: float | None = None
    secagg_clipped: int | None = None
    secagg_overflow: int | None = None


@dataclass(frozen=True)
class WireFacts:
    """What the dry run knows of a run's global model before it runs, for :meth:`Algorithm.traffic`.

    Attributes:
        state: the global model's state_dict at the configured widths (name -> tensor, its shapes
            and dtypes; what the engine broadcasts each round).
        params: scalar parameters of that model.
        clients_per_round: k, cohort clients per round.
        num_classes: K, the dataset's classes.
        upload_bytes: bytes of one client's upload of the given tensors (name -> tensor): numel x
            element size, or the encoded length under an uplink codec (:func:`fedsim.wire.upload_bytes`).
        download_bytes: the same for what the server sends (a downlink codec's encoded length).
    """

    state: P.Params
    params: int
    clients_per_round: int
    num_classes: int
    upload_bytes: Callable[[P.Params], int] = P.nbytes
    download_bytes: Callable[[P.Params], int] = P.nbytes

    @property
    def state_bytes(self) -> int:
        """Bytes of the whole state_dict as broadcast (numel x element size, or encoded under a
        downlink codec: :attr:`download_bytes`)."""
        return self.download_bytes(self.state)


@dataclass(frozen=True)
class Traffic:
    """One projected round as the dry run reports it: what crosses the wire, for the whole cohort.

    Attributes:
        phase: the phase label rounds.parquet will show (``"full"``, ``"partial"``, ``"one-shot"``,
            ``"pooled"``).
        bytes_up / bytes_down: bytes the cohort sends / receives in the round (numel x element size).
        clients: client tasks the round runs (k; 1 for pooled training).
        global_params: parameters of the model evaluated after the round (None: unknown before
            running, as PFNM's matched model).
        pooled: one task trains on every client's examples (compute counts all of them).
    """

    phase: str
    bytes_up: int
    bytes_down: int
    clients: int
    global_params: int | None
    pooled: bool = False


@dataclass
class ServerState:
    """The server's state between rounds.

    Attributes:
        params: the global model, state_dict key -> tensor.
        algo_state: the algorithm's own server state, an instance of its ``AlgoState`` dataclass
            (SCAFFOLD's control variate c, the server optimiser's moments, FedMA's assignments),
            or None for an algorithm without one (FedAvg). Checkpointed field by field.
    """

    params: P.Params
    algo_state: Any = None


@dataclass
class ClientState:
    """A client's state that the engine keeps between rounds (stateful algorithms only).

    Arrays are numpy (they travel through Ray's object store and the checkpoint); after a resume
    they come back as tensors, so readers convert with :func:`fedsim.params.from_numpy`, which
    takes either. Algorithms that keep more subclass it and set ``ClientStateType``.

    Attributes:
        bn: its BatchNorm running statistics under ``bn_stats: local`` (state_dict key ->
            array), else None.
        wire: its uplink codec's memory (:func:`fedsim.wire.transport.encode_upload`: the
            error-feedback residual and PowerSGD's factors, name -> array), else None. Set by the
            engine, never by the algorithm.
    """

    bn: dict[str, Any] | None = None
    wire: dict[str, Any] | None = None


def to_plain(x: Any) -> Any:
    """A dataclass instance as a dict of its fields (shallow; what a checkpoint stores), else ``x``."""
    if is_dataclass(x) and not isinstance(x, type):
        return {f.name: getattr(x, f.name) for f in fields(x)}
    return x


def from_plain(cls: type | None, d: Any) -> Any:
    """The ``cls`` instance whose :func:`to_plain` form is ``d`` (None stays None).

    Raises:
        TypeError: ``d`` does not have ``cls``'s fields (a checkpoint of another algorithm).
    """
    if d is None or cls is None:
        return d
    return cls(**d)


@dataclass
class ClientContext:
    """Everything :meth:`Algorithm.local_update` may use on the worker.

    Attributes:
        model: the worker's model, already holding the downloaded weights.
        received: the downloaded tensors (a frozen copy; FedProx's w_global).
        x: the client's inputs, ``(n, *input_shape)``; y: ``(n,)`` int64 labels.
        plan: this round's plan. generator: the (seed, "shuffle", round, client) torch generator.
        augment: callable applied to each input batch (identity when the dataset has none).
        optimizer: the worker's optimizer, reset for this client, over the trainable tensors.
        state: the client's :class:`ClientState` from the store (stateful algorithms; None at
            its first participation), of the algorithm's ``ClientStateType``.
        new_state: the client's new :class:`ClientState`, built by the local update
            (:meth:`Algorithm.new_client_state`); the engine stores it for the client.
        aux: scratch space for the algorithm during one client's update (e.g. MOON's frozen models).
        frozen_forwards: forward passes per example and local epoch through models that are not
            trained (MOON's global and previous model: 2 for a returning client), set by the local
            update; the round's ``flops`` add ``frozen_forwards * F`` per example and epoch to the
            training cost (3F full, 2F partial).
        local_steps: optimizer steps taken so far by :meth:`Algorithm.local_update` (one per
            minibatch); the engine reports the final count as :attr:`ClientResult.local_steps`.
        max_steps: the most optimizer steps the client may take (:attr:`ClientTask.max_steps`;
            partial work under a deadline), None for every minibatch of every local epoch.
    """

    model: FedModel
    received: P.Params
    x: torch.Tensor
    y: torch.Tensor
    plan: RoundPlan
    generator: torch.Generator
    augment: Any
    optimizer: torch.optim.Optimizer
    state: Any = None
    new_state: Any = None
    aux: dict[str, Any] = field(default_factory=dict)
    frozen_forwards: int = 0
    local_steps: int = 0
    max_steps: int | None = None


@dataclass
class StackedContext:
    """What the stacked-update hooks of :class:`Algorithm` share for one stack of clients.

    Attributes:
        model: the worker's template model (its own tensors are not used; ``functional_call``
            runs it on each client's ``tensors``).
        received: the broadcast as tensors on the worker's device, shared by every client.
        plan: the round's plan (the same for every stacked client).
        trainable: the parameter names the clients train (the plan's, or every parameter).
    """

    model: torch.nn.Module
    received: P.Params
    plan: RoundPlan
    trainable: tuple[str, ...]


class Algorithm:
    """FedAvg, and the hooks every other algorithm overrides.

    Class attributes: ``name`` (the ``algorithm:`` value), ``Config`` (its run-config class).
    ``stateful`` is True when clients keep state between rounds through the engine's store (their
    BatchNorm statistics under ``bn_stats: local``, or what a class with ``keeps_client_state``
    keeps: FedMA, MOON and SCAFFOLD).
    """

    name: ClassVar[str] = "fedavg"
    Config: ClassVar[type[RunConfig]] = RunConfig
    #: forward passes per example and local epoch through frozen models for a returning client
    #: (one with stored state), counted in ``flops`` on top of training's 3F / 2F; MOON: 2
    frozen_forwards: ClassVar[int] = 0
    #: clients keep state between rounds in the engine's store (MOON's previous model, FedMA's
    #: partially matched model, SCAFFOLD's control variate); see :attr:`stateful`
    keeps_client_state: ClassVar[bool] = False
    #: the dataclass of the algorithm's server state (:attr:`ServerState.algo_state`); None: none
    AlgoState: ClassVar[type | None] = None
    #: the dataclass of a client's stored state (:class:`ClientState` or a subclass)
    ClientStateType: ClassVar[type[ClientState]] = ClientState
    #: every round trains and sends exactly the whole model each way (FedAvg's traffic): the dry
    #: run's baseline for its byte and compute ratios
    full_network: ClassVar[bool] = False
    #: why the dry run cannot project this algorithm before it runs; None when it can
    not_projectable: ClassVar[str | None] = None
    #: run-config keys of a short run (3 communication rounds, or the algorithm's shortest
    #: schedule): what the contract test over every registered algorithm runs
    quick: ClassVar[dict[str, Any]] = {"rounds": 3}
    #: what the model name needs appended for this algorithm (MOON: ``"+moon"``, a projection head)
    model_suffix: ClassVar[str] = ""
    #: the class's local update is also written in functional form (:meth:`stacked_begin`,
    #: :meth:`stacked_loss`, :meth:`stacked_finish`), so a worker may train its clients as one
    #: stacked model (:mod:`fedsim.engine.vectorize`)
    vectorizable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that overrides the per-client update (``local_update``, ``batch_loss`` or
        ``before_step``) does not inherit ``vectorizable``: it must set it itself, next to the
        stacked hooks that mirror its update, or its clients train one by one (a FedAvg subclass
        with its own loss would otherwise be stacked with FedAvg's)."""
        super().__init_subclass__(**kwargs)
        overrides = any(name in cls.__dict__ for name in ("local_update", "batch_loss", "before_step"))
        if overrides and "vectorizable" not in cls.__dict__:
            cls.vectorizable = False

    def __init__(
        self,
        cfg: RunConfig,
        experiment: ExperimentConfig,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        """Args: the run's config, the experiment, and the dataset's class count and example
        shape (needed by algorithms that read the model's structure, such as FedMA)."""
        self.cfg = cfg
        self.experiment = experiment
        self.num_classes = num_classes
        self.input_shape = input_shape
        self._reference: dict[tuple, FedModel] = {}

    @property
    def bn_keys(self) -> tuple[str, ...]:
        """state_dict keys of the model's BatchNorm running statistics and counters."""
        if self.num_classes is None:
            return ()
        return tuple(k for k in self.reference_model().state_dict() if k.rsplit(".", 1)[-1] in BN_BUFFERS)

    @property
    def keeps_bn_local(self) -> bool:
        """``bn_stats: local`` on a model with BatchNorm: clients keep their own statistics."""
        return getattr(self.cfg, "bn_stats", "shared") == "local" and bool(self.bn_keys)

    @property
    def stateful(self) -> bool:
        """Whether the engine keeps a state per client between rounds: the class keeps client
        state (:attr:`keeps_client_state`), the clients keep their BatchNorm statistics, or the
        run's uplink codec keeps a memory (:func:`fedsim.wire.keeps_state`)."""
        from fedsim.wire import keeps_state

        return (
            self.keeps_client_state or self.keeps_bn_local or keeps_state(getattr(self.cfg, "uplink", None))
        )

    def reference_model(self, widths: dict[str, int] | None = None) -> FedModel:
        """A model of the experiment's architecture at ``widths`` (default: the configured ones),
        cached per widths: for reading its structure (layer groups, matchable layers, state_dict
        keys) and, with the global weights loaded into it, for evaluating the global model."""
        from fedsim.models import build_model, widths_key

        key = widths_key(widths)
        if key not in self._reference:
            self._reference[key] = build_model(
                self.experiment.model.name,
                num_classes=self.num_classes,
                input_shape=self.input_shape,
                widths=widths or self.experiment.model.widths,
            )
        return self._reference[key]

    # ---- server side -------------------------------------------------------------------------
    def num_rounds(self) -> int:
        """Communication rounds this run takes."""
        return self.cfg.rounds

    def init_state(self, params: P.Params) -> ServerState:
        """Server state before round 0, from the initial global weights."""
        return ServerState(params=P.clone(params))

    def starts_from_own_init(self, round: int) -> bool:
        """Whether ``round``'s clients start from their own initialisations with nothing sent down:
        round 0 under ``init: independent`` (the FedMA paper's FedAvg/FedProx baselines "without a
        shared initialisation", App. A; IBM/FedMA main.py trains each client's own init in
        ``local_train``, averages them into ``averaged_weights`` and runs ``fedavg_comm`` from
        there). The plan (:attr:`RoundPlan.own_init`) and the dry run's bytes both come from here."""
        return round == 0 and getattr(self.cfg, "init", "shared") == "independent"

    def plan_round(self, state: ServerState, round: int, cohort: tuple[int, ...]) -> RoundPlan:
        """The plan of ``round`` for the engine-sampled ``cohort`` (same cohort for every algorithm)."""
        c = self.cfg
        own_init = self.starts_from_own_init(round)
        # round 0 under init: independent may train without the run's weight decay, as the FedMA
        # authors' local models (IBM/FedMA main.py:109; independent_weight_decay)
        own_wd = getattr(c, "independent_weight_decay", None)
        return RoundPlan(
            round=round,
            cohort=cohort,
            local_epochs=c.local_epochs,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=own_wd if own_init and own_wd is not None else c.weight_decay,
            own_init=own_init,
        )

    def downlink(self, state: ServerState, plan: RoundPlan) -> P.Params:
        """Tensors broadcast to every cohort client (put in the object store once per round):
        the global model, or nothing (0 bytes) when the plan's clients start from their own
        initialisations (``plan.own_init``)."""
        return {} if plan.own_init else state.params

    def client_downlink(self, state: ServerState, plan: RoundPlan, client_id: int) -> P.Params | None:
        """Tensors sent to one client on top of the broadcast (FedMA: its sliced model or its
        assignment). Counted in that client's downlink bytes. None sends nothing extra."""
        return None

    def model_widths(self, state: ServerState) -> dict[str, int] | None:
        """Hidden-layer widths of the global model (FedMA grows them); None: the experiment's."""
        return self.experiment.model.widths

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        """Replace the uploaded tensors by their example-weighted mean
        w = sum_j (n_j / sum n) w_j (McMahan et al. 2017, Algorithm 1).

        ``results`` are in cohort order, so the sum's order never depends on arrival order.
        """
        mean = P.weighted_mean([r.upload for r in results], [r.n_examples for r in results])
        return ServerState(params={**state.params, **mean}, algo_state=state.algo_state)

    def global_weights(self, state: ServerState) -> P.Params:
        """The global model evaluated after the round."""
        return state.params

    def evaluate(
        self, state: ServerState, model: FedModel, split: Any, batch_size: int
    ) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the global model on ``split``; ``model`` is a model at
        the global widths to load the weights into."""
        from fedsim.evaluation import evaluate

        model.load_state_dict(self.global_weights(state))
        return evaluate(model, split, batch_size)

    def global_size(self, state: ServerState, model: FedModel) -> int:
        """Parameters of the global model (``model`` holds its architecture)."""
        return sum(w.numel() for w in model.parameters())

    # ---- the virtual clock (fedsim.system.clock) -----------------------------------------------
    def upload_tensors(self, state: ServerState, plan: RoundPlan) -> P.Params:
        """What one client of ``plan`` uploads, known before it trains (name -> tensor; only the
        shapes and dtypes mean anything): the plan's upload keys of the model at the global
        widths, without the BatchNorm statistics under ``bn_stats: local``; what
        :meth:`local_update` returns has exactly these tensors. The clock projects a client's
        bytes from them (numel x element size, or a codec's encoded length), and the engine
        checks the logged bytes against that."""
        ref = self.reference_model(self.model_widths(state))
        upload, _ = self._upload_and_bn(plan, ref.state_dict())
        return upload

    def training_passes(self, plan: RoundPlan, returning: bool) -> int:
        """Forward-pass costs per example and local epoch of a client's training: 3 for a full
        update, 2 for a partial one, plus :attr:`frozen_forwards` for a ``returning`` client (one
        with stored state) outside an ``own_init`` round (MOON's frozen models)."""
        frozen = self.frozen_forwards if returning and not plan.own_init else 0
        return (3 if plan.trainable is None else 2) + frozen

    # ---- dry run -------------------------------------------------------------------------------
    def projected_rounds(self, model: FedModel, input_shape: tuple[int, ...], **common: Any) -> Any:
        """The run's rounds and their model-tensor bytes, laid out by
        :func:`fedsim.accounting.project_run` (``common``: its client and epoch arguments).
        Default: :meth:`num_rounds` full-network rounds (FedPart passes its schedule instead)."""
        from fedsim import accounting

        return accounting.project_run(model, input_shape, rounds=self.num_rounds(), **common)

    def cycle_length(self) -> int | None:
        """Rounds in one cycle of a repeating schedule (FedPart's W + R x G), which the dry run's
        schedule summary groups by; None for a run without cycles."""
        return None

    def traffic(self, rp: Any, wire: WireFacts) -> Traffic:
        """What crosses the wire in projected round ``rp`` (a
        :class:`fedsim.accounting.RoundProjection`: its ``bytes_up`` are the cohort's uploads of
        model tensors): the dry run's figure for one round, which the engine's logged bytes must
        equal. Default (FedAvg): the uploads, and the whole state_dict down to every cohort
        client, or nothing down when the round's clients start from their own initialisations
        (:meth:`starts_from_own_init`)."""
        k = wire.clients_per_round
        down = 0 if self.starts_from_own_init(rp.round) else k * wire.state_bytes
        return Traffic(rp.phase, rp.bytes_up, down, k, wire.params)

    # ---- client side -------------------------------------------------------------------------
    def client_weights(
        self, task: ClientTask, received: P.Params, state: Any, init: Callable[[torch.Generator], P.Params]
    ) -> tuple[dict[str, int] | None, P.Params]:
        """(widths, weights) of the model the client trains this round, on the worker.

        Args:
            received: the broadcast plus the client's own downlink, as tensors.
            state: the client's stored state (stateful algorithms), else None.
            init: builds a fresh model of the experiment's widths from a generator and returns
                its state_dict (FedMA's clients start from independent initialisations).

        The default trains the received global model at the experiment's widths, with the
        client's own BatchNorm statistics under ``bn_stats: local``; when the plan says
        ``own_init`` (round 0 under ``init: independent``; nothing was received) it trains the
        client's own initialisation (:meth:`own_init`) instead, whole state_dict included.
        """
        if task.plan.own_init:
            return None, self.own_init(task, init)
        if self.keeps_bn_local and state is not None and state.bn is not None:
            device = next(iter(received.values())).device
            received = {**received, **{k: v.to(device) for k, v in P.from_numpy(state.bn).items()}}
        return None, received

    def own_init(self, task: ClientTask, init: Callable[[torch.Generator], P.Params]) -> P.Params:
        """The client's own initial weights, shared with no other client (FedMA, PFNM and the
        ensemble start from them, and round 0 of a full-network run under ``init: independent``):
        drawn from the (seed, "init", 0, client + 1) stream, so they differ from the global
        model's (seed, "init", 0, 0) initialisation. Returns the state_dict ``init`` builds
        (name -> tensor, the model's shapes and dtypes)."""
        from fedsim.rng import torch_rng

        return init(torch_rng(self.experiment.seed, "init", 0, task.client_id + 1))

    def batch_loss(
        self, ctx: ClientContext, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective to minimise, cross-entropy) for one batch. FedAvg: both are the mean CE.

        Args:
            x: ``(B, *input_shape)`` inputs (augmented); y: ``(B,)`` int64 labels.
        """
        ce = F.cross_entropy(ctx.model(x), y)
        return ce, ce

    # ---- stacked (vectorised) local update: fedsim.engine.vectorize ----------------------------
    def stacked_begin(self, sctx: StackedContext, states: list[Any]) -> dict[str, torch.Tensor]:
        """Per-client tensors for :meth:`stacked_loss`, built once before a stacked local update.

        Args:
            sctx: the stack's shared context; states: each stacked client's stored state (None
                for a first participation), in stack order.

        Returns:
            name -> tensor of shape ``(K, ...)``, row i belonging to the i-th stacked client;
            :meth:`stacked_loss` receives row i as ``aux`` under ``vmap``. FedAvg: ``{}``.
        """
        return {}

    def stacked_loss(
        self,
        sctx: StackedContext,
        tensors: P.Params,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        aux: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`batch_loss` of one client in functional form, called under ``torch.func.vmap``.

        Args:
            sctx: the stack's shared context (template model, received tensors, plan, trainable names).
            tensors: the client's parameters and buffers (state_dict key -> tensor of the model's shape).
            x: ``(B, *input_shape)`` float inputs (padding rows included); y: ``(B,)`` int64 labels.
            w: ``(B,)`` example weights: 1/b on the b real examples of the batch, 0 on padding,
                so a weighted sum is the mean over the real batch.
            aux: row i of :meth:`stacked_begin`'s tensors.

        Returns:
            (objective, cross-entropy), 0-dim each. FedAvg: both the weighted cross-entropy.
        """
        from torch.func import functional_call

        ce = (F.cross_entropy(functional_call(sctx.model, tensors, (x,)), y, reduction="none") * w).sum()
        return ce, ce

    def stacked_finish(
        self, sctx: StackedContext, task: ClientTask, state: Any, final: P.Params, steps: int
    ) -> tuple[P.Params, ClientState | None, int]:
        """One stacked client's (upload, new stored state, frozen forwards per example and epoch),
        from its ``final`` state_dict (key -> tensor, the model's order) after ``steps`` optimizer
        steps: what :meth:`local_update` returns and sets on the per-client path. FedAvg: the
        plan's upload keys, and the BatchNorm statistics as the new state under ``bn_stats: local``."""
        upload, bn = self._upload_and_bn(task.plan, final)
        return upload, None if bn is None else self.client_state_type()(bn=bn), 0

    def _upload_and_bn(self, plan: RoundPlan, final: P.Params) -> tuple[P.Params, dict | None]:
        """From a client's final state_dict (key -> tensor): its upload (the plan's ``upload``
        keys, or all; without the BatchNorm statistics under ``bn_stats: local``) and those
        statistics as arrays for its stored state (None unless ``bn_stats: local``)."""
        keys = plan.upload if plan.upload is not None else tuple(final)
        if not self.keeps_bn_local:
            return {k: final[k].detach() for k in keys}, None
        bn = set(self.bn_keys)
        upload = {k: final[k].detach() for k in keys if k not in bn}
        return upload, P.to_numpy({k: final[k] for k in self.bn_keys})

    def client_state_type(self) -> type[ClientState]:
        """The class of a client's stored state (FedPart: its local objective's)."""
        return self.ClientStateType

    def new_client_state(self, ctx: ClientContext) -> ClientState:
        """``ctx.new_state``, created empty (of :meth:`client_state_type`) on first use: the
        state the engine stores for the client after this round."""
        if ctx.new_state is None:
            ctx.new_state = self.client_state_type()()
        return ctx.new_state

    def before_step(self, ctx: ClientContext) -> None:
        """Called for every minibatch after ``backward`` and before ``optimizer.step``, with each
        trainable parameter's gradient in its ``.grad``. FedAvg: nothing (SCAFFOLD adds its
        control-variate correction c - c_i here)."""

    def local_update(self, ctx: ClientContext) -> tuple[P.Params, float]:
        """E local epochs of minibatch training on the client's data; returns (upload, mean CE).

        Batches come from a fresh permutation per epoch drawn from ``ctx.generator``; the last
        batch of an epoch may be smaller; every batch is one optimizer step, counted in
        ``ctx.local_steps``; training stops after ``ctx.max_steps`` steps when that is set (partial
        work). Parameters outside ``plan.trainable`` get no gradient.
        In an ``own_init`` round the objective is the plain cross-entropy of
        :meth:`Algorithm.batch_loss` whatever the algorithm: nothing was received, so there is no
        global model for FedProx's proximal or MOON's contrastive term to refer to (the FedMA
        authors' ``local_train`` trains with cross-entropy alone, IBM/FedMA main.py ``train_net``).
        """
        model, plan, opt = ctx.model, ctx.plan, ctx.optimizer
        batch_loss = partial(Algorithm.batch_loss, self) if plan.own_init else self.batch_loss
        n = ctx.y.shape[0]
        bs = self.cfg.batch_size
        model.train()
        loss_sum, seen = 0.0, 0
        cap = ctx.max_steps
        for _ in range(plan.local_epochs):
            if cap is not None and ctx.local_steps >= cap:
                break
            order = torch.randperm(n, generator=ctx.generator)
            for start in range(0, n, bs):
                if cap is not None and ctx.local_steps >= cap:
                    break
                idx = order[start : start + bs]
                xb, yb = ctx.augment(ctx.x[idx]), ctx.y[idx]
                opt.zero_grad(set_to_none=True)
                objective, ce = batch_loss(ctx, xb, yb)
                objective.backward()
                self.before_step(ctx)
                opt.step()
                ctx.local_steps += 1
                loss_sum += float(ce.detach()) * len(idx)
                seen += len(idx)
        upload, bn = self._upload_and_bn(plan, model.state_dict())
        if bn is not None:
            self.new_client_state(ctx).bn = bn
        return upload, loss_sum / max(seen, 1)
