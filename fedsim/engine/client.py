"""Client work: the code a ClientWorker actor (or the sequential backend) runs for each task.

A :class:`ClientRunner` lives as long as its worker. It keeps one model per architecture and one
optimizer per model and trainable set, and reuses them for every client it serves: weights are
loaded in place (``load_state_dict`` copies into the existing tensors) and optimizer state is
cleared, so no client pays for model construction or a DataLoader.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedsim import params as P
from fedsim.accounting import forward_cost
from fedsim.algorithms import ALGORITHMS, Algorithm, ClientContext, ClientResult, ClientTask, RoundPlan
from fedsim.config import ExperimentConfig, RunConfig
from fedsim.data.base import FederatedDataset
from fedsim.engine.augment import augmenter
from fedsim.models import build_model, widths_key
from fedsim.rng import seed_for, torch_rng
from fedsim.system.clock import examples_in_steps


def make_algorithm(run: RunConfig, experiment: ExperimentConfig, dataset: FederatedDataset) -> Algorithm:
    """The algorithm object of one run (built on the driver and on every worker).

    Raises:
        FedsimError: the algorithm cannot run this experiment (e.g. FedMA on a model without
            matchable layers).
    """
    return ALGORITHMS[run.algorithm](run, experiment, dataset.num_classes, tuple(dataset.input_shape))


def set_threads(cpus: float) -> int:
    """Set torch's intra-op threads to a worker's CPU share (at least 1); returns the count."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


def warm_up() -> None:
    """Create and drop a throwaway optimizer, so torch's lazy import of ``torch._dynamo`` (several
    seconds, paid once per process by the first optimizer) happens while a worker starts, not
    inside its first client's training."""
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def freeze_startup_objects() -> None:
    """Move every object alive now (imported modules, the dataset, cached models) to the garbage
    collector's permanent generation (``gc.freeze``), so full collections stop traversing them.
    Called once a worker or the driver has started: without it, full collections over torch's and
    Ray's hundreds of thousands of objects show as round-time spikes (figures in
    docs/performance.md)."""
    gc.freeze()


def trainable_count(model: torch.nn.Module, names: tuple[str, ...] | None) -> int:
    """Scalar parameters of ``model`` named in ``names`` (every parameter for None): what
    ``trainable_params`` in rounds.parquet counts.

    Raises:
        KeyError: a name is not a parameter of ``model``.
    """
    params = dict(model.named_parameters())
    return P.numel(params if names is None else P.subset(params, names))


def trainable_names(model: torch.nn.Module, plan: RoundPlan) -> tuple[str, ...]:
    """The parameter names of ``model`` that ``plan`` trains, in the model's order: the plan's
    ``trainable`` keys, or every parameter when it is None."""
    names = tuple(k for k, _ in model.named_parameters())
    return names if plan.trainable is None else tuple(k for k in names if k in set(plan.trainable))


def trained_examples(n_examples: int, task: ClientTask, batch_size: int, steps: int) -> int:
    """Examples one client's local training processed, over all its epochs: ``n_examples`` x
    ``local_epochs``, or under partial work (``task.max_steps`` set) those of its first ``steps``
    minibatches (:func:`fedsim.system.clock.examples_in_steps`)."""
    if task.max_steps is None:
        return n_examples * task.plan.local_epochs
    return examples_in_steps(n_examples, batch_size, steps)


def training_macs(examples: int, plan: RoundPlan, frozen_forwards: int, forward: int) -> int:
    """Multiply-accumulates of one client's local training: ``examples`` processed over all its
    local epochs (:func:`trained_examples`) x (3 forward-pass costs for a full update, 2 for a
    partial one, whose frozen tensors need no weight gradient, plus ``frozen_forwards`` passes
    through frozen models such as MOON's) x ``forward`` (F, MACs of one example's forward pass)."""
    passes = (3 if plan.trainable is None else 2) + frozen_forwards
    return int(examples * passes * forward)


class ClientRunner:
    """Runs client tasks against one dataset, reusing models and optimizers across clients.

    Args:
        experiment: the resolved experiment (model name, seed, engine settings).
        dataset: the federated dataset (numpy arrays; zero-copy from Ray's object store).
        device: torch device string for local training, e.g. ``"cpu"`` or ``"cuda"``.
        worker_id: label recorded in clients.parquet.
    """

    def __init__(
        self,
        experiment: ExperimentConfig,
        dataset: FederatedDataset,
        device: str = "cpu",
        worker_id: str = "local",
    ):
        self.experiment = experiment
        self.dataset = dataset
        self.device = torch.device(device)
        self.worker_id = worker_id
        self._models: dict[tuple, torch.nn.Module] = {}
        self._optimizers: dict[tuple, torch.optim.Optimizer] = {}
        self._algorithms: dict[str, Algorithm] = {}
        self._forward: dict[tuple, int] = {}  # forward MACs per example by model widths
        self._received: tuple[Any, P.Params] | None = None  # (last broadcast, as tensors on device)
        self._states: dict[int, dict[str, torch.Tensor]] = {}  # id(model) -> its state_dict views
        #: id(model) -> its stacked-update template (fedsim.engine.vectorize.template), or None
        #: when the model cannot be stacked
        self.templates: dict[int, Any] = {}

    def tensors(self, received: dict[str, np.ndarray]) -> P.Params:
        """The broadcast as tensors on the device, converted once per round: every client of a
        worker's batch receives the same dict. The tensors are shared; clients only read them."""
        if self._received is None or self._received[0] is not received:
            self._received = (received, {k: v.to(self.device) for k, v in P.from_numpy(received).items()})
        return self._received[1]

    def load(self, model: torch.nn.Module, weights: P.Params) -> None:
        """Copy ``weights`` into ``model``'s tensors in place (keys it lacks stay as they are),
        without ``load_state_dict``'s per-module traversal.

        Raises:
            ValueError: a weight's shape differs from the model's tensor (e.g. widths mismatch).
        """
        views = self._states.get(id(model))
        if views is None:
            views = self._states[id(model)] = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, w in weights.items():
                t = views.get(k)
                if t is None:
                    continue
                if t.shape != w.shape:
                    raise ValueError(
                        f"weight {k!r} has shape {tuple(w.shape)} but the model's is {tuple(t.shape)}"
                    )
                t.copy_(w)

    def model(self, widths: dict[str, int] | None = None):
        """The cached model for ``widths`` (built once per architecture)."""
        key = widths_key(widths)
        if key not in self._models:
            m = build_model(
                self.experiment.model.name,
                num_classes=self.dataset.num_classes,
                input_shape=self.dataset.input_shape,
                widths=widths or self.experiment.model.widths,
            )
            self._models[key] = m.to(self.device)
        return self._models[key]

    def optimizer(
        self, model: torch.nn.Module, run: RunConfig, names: tuple[str, ...], plan
    ) -> torch.optim.Optimizer:
        """The cached optimizer over ``names`` of ``model``, state cleared and settings from ``plan``."""
        key = (id(model), run.optimizer, names)
        opt = self._optimizers.get(key)
        if opt is None:
            named = dict(model.named_parameters())
            tensors = [named[k] for k in names]
            if run.optimizer == "adam":
                opt = torch.optim.Adam(tensors, lr=plan.lr, weight_decay=plan.weight_decay)
            else:
                opt = torch.optim.SGD(
                    tensors, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay
                )
            self._optimizers[key] = opt
        opt.state.clear()
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = plan.lr, plan.weight_decay
            if "momentum" in group:
                group["momentum"] = plan.momentum
        return opt

    def examples(self, task: ClientTask) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's training examples on the device: ``x`` ``(n, *input_shape)`` and ``y``
        ``(n,)`` int64; every client's, pooled, when the plan says ``pooled``."""
        idx = (
            np.concatenate(self.dataset.client_indices)
            if task.plan.pooled
            else self.dataset.client_indices[task.client_id]
        )
        x = torch.from_numpy(self.dataset.train.inputs(idx)).to(self.device)
        return x, torch.from_numpy(self.dataset.train.y[idx]).to(self.device)

    def augment(self, task: ClientTask) -> Callable[[torch.Tensor], torch.Tensor]:
        """The task's batch transform: the dataset's augmentation driven by the client's
        (seed, "augment", round, client) generator, or the identity."""
        kind = self.dataset.augment
        seed = self.experiment.seed
        return augmenter(
            kind, None if kind is None else torch_rng(seed, "augment", task.round, task.client_id)
        )

    def algorithm(self, run: RunConfig) -> Algorithm:
        if run.label not in self._algorithms:
            self._algorithms[run.label] = make_algorithm(run, self.experiment, self.dataset)
        return self._algorithms[run.label]

    def forward_macs(self, widths: dict[str, int] | None, model: torch.nn.Module) -> int:
        """F, multiply-accumulates of one example's forward pass through ``model`` (the cached
        model at ``widths``; thop's convention), computed once per architecture."""
        key = widths_key(widths)
        if key not in self._forward:
            self._forward[key] = forward_cost(model, self.dataset.input_shape, "thop")
        return self._forward[key]

    def _fresh_weights(self, generator: torch.Generator) -> P.Params:
        m = build_model(
            self.experiment.model.name,
            num_classes=self.dataset.num_classes,
            input_shape=self.dataset.input_shape,
            widths=self.experiment.model.widths,
            generator=generator,
        )
        return {k: v.to(self.device) for k, v in m.state_dict().items()}

    def run(
        self,
        run: RunConfig,
        task: ClientTask,
        received: dict[str, np.ndarray],
        state: Any = None,
        extra: dict[str, np.ndarray] | None = None,
    ) -> ClientResult:
        """Train client ``task.client_id`` from the ``received`` tensors and return its upload.

        Args:
            run: the run's config; task: the client task; received: name -> numpy array
                broadcast to the cohort (the global model, or the part of it the plan sends);
                state: the client's stored state for stateful algorithms; extra: tensors sent to
                this client alone (counted in its downlink bytes).

        Returns:
            A :class:`ClientResult` whose bytes are the exact sizes of ``received`` and the upload.
        """
        t0 = time.perf_counter()
        algo = self.algorithm(run)
        plan = task.plan
        down = self.tensors(received)
        if extra:
            down = {**down, **{k: v.to(self.device) for k, v in P.from_numpy(extra).items()}}
        widths, weights = algo.client_weights(task, down, state, self._fresh_weights)
        model = self.model(widths)
        self.load(model, weights)  # in-place copy into the cached model
        trainable = trainable_names(model, plan)
        for k, w in model.named_parameters():
            w.requires_grad_(k in trainable)
        x, y = self.examples(task)
        ctx = ClientContext(
            model=model,
            received=down,
            x=x,
            y=y,
            plan=plan,
            generator=torch_rng(self.experiment.seed, "shuffle", task.round, task.client_id),
            augment=self.augment(task),
            optimizer=self.optimizer(model, run, trainable, plan),
            state=state,
            max_steps=task.max_steps,
        )
        # Dropout draws from torch's global generator (it takes no generator argument): seed it
        # from (seed, "dropout", round, client) inside fork_rng so nothing outside is disturbed.
        # (torch.manual_seed would also touch every CUDA device, a cost paid for every client.)
        gpus = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            dropout_seed = seed_for(self.experiment.seed, "dropout", task.round, task.client_id)
            torch.random.default_generator.manual_seed(dropout_seed)
            if gpus:
                torch.cuda.manual_seed(dropout_seed)
            upload, train_loss = algo.local_update(ctx)
        upload_np = P.to_numpy(upload)
        examples = trained_examples(len(y), task, run.batch_size, ctx.local_steps)
        macs = training_macs(examples, plan, ctx.frozen_forwards, self.forward_macs(widths, model))
        return ClientResult(
            client_id=task.client_id,
            round=task.round,
            upload=upload_np,
            n_examples=len(y),
            train_loss=float(train_loss),
            bytes_up=0 if plan.pooled else P.nbytes(upload_np),
            bytes_down=0 if plan.pooled else P.nbytes({**received, **(extra or {})}),
            seconds=time.perf_counter() - t0,
            worker=self.worker_id,
            attempt=task.attempt,
            state=ctx.new_state,
            macs=int(macs),
            trainable_params=trainable_count(model, trainable),
            local_steps=ctx.local_steps,
        )
