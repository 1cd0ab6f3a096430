"""FedMA with communication (Wang et al., "Federated Learning with Matched Averaging", ICLR 2020,
Algorithm 1 and section 2.3) and PFNM one-shot matching (Yurochkin et al., ICML 2019), as in
docs/algorithms.md sections 2-4.

One FedMA round over a network with N-1 matchable layers and a classifier takes N communication
rounds, each a row of rounds.parquet (``phase``/``layer`` columns). With ``p, k = divmod(round, N)``:

* k = 0: every client starts from the global model sliced back to its original widths by its
  assignments of the previous FedMA round (in FedMA round 0: from its own initialisation, shared
  with nobody), trains the whole model for ``local_epochs``, keeps it (client state) and uploads
  layer 0. The server matches layer 0 with BBP-MAP (:func:`fedsim.matching.bbp_map`).
* 0 < k < N-1: the server has sent global layer k-1 and each client its assignment a_j (int32 per
  local neuron). The client puts the global layer in place of its own, moves its layer k's input
  axis to global positions (zero-padded), freezes layers 0..k-1, retrains layers k.. for
  ``retrain_epochs`` at ``retrain_lr`` (null: ``lr``; the authors' ``--retrain_lr``) and uploads
  layer k, which the server matches.
* k = N-1: as above, but only the classifier is left to train, with weight decay 1e-4 and, under
  ``classifier_retrain: appendix_a`` (the default for CNNs), retrain_lr / 10 and 3x the epochs
  (paper, Appendix A), or under ``plain`` (the default for LSTMs) retrain_lr and the retrain
  epochs. The client uploads the classifier and its class counts; the
  server averages class k's column weighted by n_jk / sum_j n_jk (a class absent everywhere gets
  the plain mean). The global model (matched layers + classifier) is evaluated.

The algorithm reads the model's structure from :meth:`FedModel.match_layers` and
:meth:`FedModel.classifier` only: no per-model branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedsim import params as P
from fedsim.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    ClientState,
    ClientTask,
    RoundPlan,
    ServerState,
    Traffic,
    WireFacts,
)
from fedsim.algorithms.registry import register
from fedsim.config import ExperimentConfig, FedMAConfig, PFNMConfig, RunConfig
from fedsim.errors import FedsimError
from fedsim.matching import bbp_map
from fedsim.matching.atoms import (
    atom_prior_mean,
    atoms_to_layer,
    layer_atoms,
    n_units,
    outgoing_atoms,
    permute_next_input,
    permute_recurrent,
    slice_to_client,
)
from fedsim.models.base import MatchLayer
from fedsim.rng import seed_for

ASSIGNMENT = "__assignment__"  # int32 (L_j,) sent down with a global layer
CLASS_COUNTS = "__class_counts__"  # int64 (K,) sent up with the classifier


def _tensors_of(layer: MatchLayer) -> tuple[str, ...]:
    return tuple(k for k in (layer.weight, layer.bias, *layer.recurrent) if k is not None)


def match_layer(
    uploads: list[P.Params],
    layer: MatchLayer,
    cfg: FedMAConfig,
    seed: int,
    outgoing: bool = False,
    first: bool = True,
) -> tuple[P.Params, list[np.ndarray]]:
    """Match one layer across clients: BBP-MAP over the clients' atoms (docs/algorithms.md section 2).

    Args:
        uploads: J dicts holding the layer's tensors (input axis already in global order), e.g.
            a linear layer's weight ``(L_j, in)`` and bias ``(L_j,)``; with ``outgoing`` also the
            next layer's weight.
        layer: the layer's metadata; cfg: the run's BBP-MAP hyper-parameters and protocol options
            (``growth_budget``, ``lstm_estimate``); seed: sweep seed.
        outgoing: append each unit's outgoing weights (:func:`fedsim.matching.outgoing_atoms`) to
            its atom for the matching, with prior mean 0 and the same precision 1/sigma2 (PFNM's
            authors weigh them by the client's share of each class instead; fedsim's matcher takes
            one precision for every client). They only steer the assignment: the returned tensors
            are the layer's own.
        first: whether this is the model's first matched layer. Under ``prior_mean_order:
            authors`` every later linear or conv layer gets the FedMA authors' prior mean: 0.1 on
            its first weight coordinate and 0 on its bias (IBM/FedMA matching/pfnm.py,
            layer_wise_group_descent, lines 887-888 and 917-918).

    Returns:
        (global tensors of the layer with L units, J int64 assignments of lengths L_j). A global
        neuron is the prior-shrunk MAP estimate G_i / P_i, except for embedding and LSTM layers
        under ``lstm_estimate: mean``: there it is the plain mean of its matched clients' atoms,
        as in the authors' LSTM code (IBM/FedMA language_modeling/lstm_fedma_with_comm.py, lines
        366-371 for the embedding, 385-398 for the input-to-hidden weights and biases). For an
        LSTM, the recurrent tensors are (1/J) sum_j Pi_j H_j Pi_j^T per gate (section 3).
    """
    atoms = [layer_atoms(u, layer) for u in uploads]
    D = atoms[0].shape[1]
    prior = atom_prior_mean(layer, D)
    if cfg.prior_mean_order == "authors" and not first and layer.kind in ("linear", "conv2d") and layer.bias:
        prior = np.roll(prior, 1)  # [w..., b] -> [b, w...]: 0.1 moves from the bias to weight 0
    if outgoing:
        extra = [outgoing_atoms(u, layer) for u in uploads]
        atoms = [torch.cat([a, e.to(a.dtype)], 1) for a, e in zip(atoms, extra)]
        prior = np.concatenate([prior, np.zeros(extra[0].shape[1])])
    res = bbp_map(
        atoms,
        sigma2=cfg.sigma2,
        sigma0_2=cfg.sigma0_2,
        gamma=cfg.gamma,
        prior_mean=prior,
        iterations=cfg.iterations,
        seed=seed,
        max_global_neurons=cfg.max_global_neurons,
        growth_budget=cfg.growth_budget,
    )
    L = int(res.global_atoms.shape[0])
    if layer.kind in ("embedding", "lstm") and cfg.lstm_estimate == "mean":
        sums = torch.zeros((L, atoms[0].shape[1]), dtype=torch.float64)
        for a, idx in zip(atoms, res.assignments):
            sums.index_add_(0, torch.as_tensor(idx), a.to(torch.float64).cpu())
        global_atoms = (sums / torch.as_tensor(res.counts, dtype=torch.float64)[:, None]).numpy()
    else:
        global_atoms = res.global_atoms
    out = atoms_to_layer(global_atoms[:, :D], layer, uploads[0])
    if layer.recurrent:
        placed = [permute_recurrent(u, layer, a, L) for u, a in zip(uploads, res.assignments)]
        for key in layer.recurrent:
            out[key] = torch.stack([p[key] for p in placed]).mean(0)
    return out, [np.asarray(a, dtype=np.int64) for a in res.assignments]


def average_classifier(uploads: list[P.Params], keys: tuple[str, str], counts: list[np.ndarray]) -> P.Params:
    """Class-proportion-weighted classifier (docs/algorithms.md section 3, last layer).

    Row c of the weight ``(K, D)`` and entry c of the bias ``(K,)`` are sum_j (n_jc / sum_j' n_j'c)
    times client j's; a class no client holds gets the plain mean over clients.

    Args:
        uploads: J dicts with the classifier's weight and bias (input axis in global order).
        keys: (weight key, bias key); counts: J int arrays (K,) of class counts n_jc.
    """
    n = torch.as_tensor(np.stack(counts), dtype=torch.float64)  # (J, K)
    total = n.sum(0, keepdim=True)  # (1, K)
    w = torch.where(total > 0, n / total.clamp(min=1), torch.full_like(n, 1.0 / n.shape[0]))  # (J, K)
    out = {}
    for key in keys:
        stack = torch.stack([u[key].to(torch.float64) for u in uploads])  # (J, K, ...)
        shape = (w.shape[0], w.shape[1]) + (1,) * (stack.ndim - 2)
        out[key] = (stack * w.reshape(shape)).sum(0).to(uploads[0][key].dtype)
    return out


@dataclass
class FedMAState:
    """FedMA's server state between communication rounds.

    Attributes:
        widths: hidden-layer widths of the global model after the last full pass (None before).
        assign: client id -> its assignments so far in this pass, one int array (L_j,) per
            matched layer: local unit l -> global unit.
        prev_assign: the previous pass's ``assign`` (slices the global model back to each
            client's widths at the start of the next pass).
        layers: matched layer index -> that layer's global tensors (state_dict key -> tensor).
    """

    widths: dict[str, int] | None = None
    assign: dict[int, list[Any]] = field(default_factory=dict)
    prev_assign: dict[int, list[Any]] = field(default_factory=dict)
    layers: dict[int, P.Params] = field(default_factory=dict)


@dataclass
class FedMAClientState(ClientState):
    """A FedMA client's stored state: ``local``, its partially matched model (state_dict key ->
    array), whose matched layers the next layer step replaces with the global ones."""

    local: dict[str, Any] | None = None


@register
class FedMA(Algorithm):
    """FedMA with communication; see the module docstring for the round structure."""

    name = "fedma"
    quick = {"rounds": 1, "iterations": 1}
    Config = FedMAConfig
    keeps_client_state = True  # each client keeps its partially matched local model between layer steps
    AlgoState = FedMAState
    ClientStateType = FedMAClientState
    not_projectable = (
        "not projectable: the global model's size depends on matching (each layer grows "
        "between max_j L_j and sum_j L_j neurons), so the bytes of later rounds are unknown"
    )

    def __init__(
        self,
        cfg: RunConfig,
        experiment: ExperimentConfig,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__(cfg, experiment, num_classes, input_shape)
        ref = self.reference_model()
        self.layers: list[MatchLayer] = ref.match_layers()
        self.classifier_keys: tuple[str, str] = ref.classifier()
        if not self.layers:
            raise FedsimError(
                f"model {experiment.model.name!r} has no matchable layers; {self.name} needs one "
                "of lenet, lenet_fedma, vgg9, char_lstm, digits_cnn"
            )
        self.N = len(self.layers) + 1
        rule = self.cfg.classifier_retrain
        if rule == "auto":
            rule = "plain" if any(layer.kind == "lstm" for layer in self.layers) else "appendix_a"
        self.classifier_rule: str = rule
        self.base_widths = dict(ref.widths)
        self.param_names = tuple(name for name, _ in ref.named_parameters())

    # ---- schedule --------------------------------------------------------------------------
    def num_rounds(self) -> int:
        return self.cfg.rounds * self.N

    def _outgoing(self, k: int) -> bool:
        """Whether layer k is matched with its outgoing weights: only the last hidden layer (the one
        feeding the classifier), under ``match_outgoing``."""
        return self.cfg.match_outgoing and self.layers[k].next_weight == self.classifier_keys[0]

    def _upload(self, k: int) -> tuple[str, ...]:
        """Keys clients upload for matching layer k: its tensors, plus the classifier's weight when
        the layer is matched with its outgoing weights."""
        layer = self.layers[k]
        return _tensors_of(layer) + ((layer.next_weight,) if self._outgoing(k) else ())

    def _frozen(self, k: int) -> set[str]:
        return {t for layer in self.layers[:k] for t in _tensors_of(layer)}

    def plan_round(self, state: ServerState, round: int, cohort: tuple[int, ...]) -> RoundPlan:
        c = self.cfg
        k = round % self.N
        retrain = c.retrain_epochs or c.local_epochs
        retrain_lr = c.lr if c.retrain_lr is None else c.retrain_lr  # IBM/FedMA main.py:54, --retrain_lr
        if k == 0:
            return RoundPlan(
                round=round,
                cohort=cohort,
                local_epochs=c.local_epochs,
                lr=c.lr,
                momentum=c.momentum,
                weight_decay=c.weight_decay,
                phase="match",
                layer=0,
                upload=self._upload(0),
                evaluate=False,
            )
        trainable = tuple(n for n in self.param_names if n not in self._frozen(k))
        if k < self.N - 1:  # retraining layers k..N-1 after layer k-1 was matched: no weight decay (App. A)
            return RoundPlan(
                round=round,
                cohort=cohort,
                local_epochs=retrain,
                lr=retrain_lr,
                momentum=c.momentum,
                weight_decay=0.0,
                phase="match",
                layer=k,
                trainable=trainable,
                upload=self._upload(k),
                evaluate=False,
            )
        if self.classifier_rule == "appendix_a":  # paper App. A; IBM/FedMA main.py, local_retrain
            epochs, lr = 3 * retrain, retrain_lr / 10
        else:  # IBM/FedMA language_modeling/lstm_fedma_with_comm.py: the decoder at its one lr
            epochs, lr = retrain, retrain_lr
        return RoundPlan(
            round=round,
            cohort=cohort,
            local_epochs=epochs,
            lr=lr,
            momentum=c.momentum,
            weight_decay=1e-4,
            phase="classifier",
            layer=k,
            trainable=trainable,
            upload=self.classifier_keys,
            evaluate=True,
        )

    # ---- server ----------------------------------------------------------------------------
    def init_state(self, params: P.Params) -> ServerState:
        return ServerState(params=P.clone(params), algo_state=FedMAState())

    def downlink(self, state: ServerState, plan: RoundPlan) -> P.Params:
        k = plan.layer
        return {} if k == 0 else dict(state.algo_state.layers[k - 1])

    def client_downlink(self, state: ServerState, plan: RoundPlan, client_id: int) -> P.Params | None:
        k = plan.layer
        if k == 0:
            prev = state.algo_state.prev_assign.get(client_id)
            return None if prev is None else slice_to_client(state.params, self.layers, prev)
        a = state.algo_state.assign[client_id][k - 1]
        return {ASSIGNMENT: torch.as_tensor(a, dtype=torch.int32)}

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        k, s = plan.layer, state.algo_state
        uploads = [P.from_numpy(r.upload) for r in results]
        if k == 0:  # a new pass
            s = replace(s, assign={}, layers={})
        if k < self.N - 1:
            seed = seed_for(self.experiment.seed, "matching", plan.round, k)
            tensors, assigns = match_layer(uploads, self.layers[k], self.cfg, seed, self._outgoing(k), k == 0)
            assign = {r.client_id: [*s.assign.get(r.client_id, []), a] for r, a in zip(results, assigns)}
            return ServerState(
                params=state.params, algo_state=replace(s, layers={**s.layers, k: tensors}, assign=assign)
            )
        params, widths = self._assemble(list(s.layers.values()), uploads, results)
        return ServerState(params=params, algo_state=replace(s, widths=widths, prev_assign=s.assign))

    def _assemble(
        self, layer_tensors: list[P.Params], uploads: list[P.Params], results: list[ClientResult]
    ) -> tuple[P.Params, dict[str, int]]:
        """The global model: matched layers + the class-proportion-weighted classifier, in the
        state_dict order of the model at the global widths."""
        params: P.Params = {}
        for tensors in layer_tensors:
            params.update(tensors)
        counts = [r.upload[CLASS_COUNTS] for r in results]
        params.update(average_classifier(uploads, self.classifier_keys, counts))
        widths = {layer.name: n_units(params, layer) for layer in self.layers}
        return {key: params[key] for key in self.reference_model(widths).state_dict()}, widths

    def model_widths(self, state: ServerState) -> dict[str, int] | None:
        return state.algo_state.widths or self.experiment.model.widths

    # ---- client ----------------------------------------------------------------------------
    def client_weights(self, task: ClientTask, received: P.Params, state: Any, init):
        k = task.plan.layer
        if k == 0:
            if received:  # the global model sliced back to this client's original widths
                return self.base_widths, received
            return self.base_widths, self.own_init(task, init)
        device = received[ASSIGNMENT].device
        local = {key: v.to(device) for key, v in P.from_numpy(state.local).items()}
        layer = self.layers[k - 1]
        L = n_units(received, layer)
        local.update({t: received[t] for t in _tensors_of(layer)})
        local = permute_next_input(local, layer, received[ASSIGNMENT].long(), L)
        widths = dict(self.base_widths)
        for done in self.layers[:k]:
            widths[done.name] = n_units(local, done)
        return widths, local

    def local_update(self, ctx: ClientContext) -> tuple[P.Params, float]:
        upload, loss = super().local_update(ctx)
        ctx.new_state = FedMAClientState(local=P.to_numpy(ctx.model.state_dict()))
        if ctx.plan.layer == self.N - 1:
            upload = {**upload, CLASS_COUNTS: torch.bincount(ctx.y.cpu(), minlength=self.num_classes)}
        return upload, loss


@register
class PFNM(FedMA):
    """PFNM one-shot matching (FedMA paper, Figure 1 baseline): clients train from their own
    initialisations, upload once, and the server matches layer by layer without retraining,
    moving each client's next-layer input axis by its assignment between layers."""

    name = "pfnm"
    quick = {"iterations": 1}
    Config = PFNMConfig
    keeps_client_state = False
    not_projectable = None

    def num_rounds(self) -> int:
        return 1

    def traffic(self, rp: Any, wire: WireFacts) -> Traffic:
        """One round: each cohort client uploads its whole model and its class counts (K int64),
        nothing goes down; the matched model's size is known only after matching (None)."""
        k = wire.clients_per_round
        return Traffic("one-shot", rp.bytes_up + k * 8 * wire.num_classes, 0, k, None)

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
            layer=None,
            evaluate=True,
        )

    def downlink(self, state: ServerState, plan: RoundPlan) -> P.Params:
        return {}

    def client_downlink(self, state: ServerState, plan: RoundPlan, client_id: int) -> P.Params | None:
        return None

    def client_weights(self, task: ClientTask, received: P.Params, state: Any, init):
        return self.base_widths, self.own_init(task, init)

    def local_update(self, ctx: ClientContext) -> tuple[P.Params, float]:
        upload, loss = Algorithm.local_update(self, ctx)
        return {**upload, CLASS_COUNTS: torch.bincount(ctx.y.cpu(), minlength=self.num_classes)}, loss

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        uploads = [P.from_numpy(r.upload) for r in results]
        matched = []
        for k, layer in enumerate(self.layers):
            seed = seed_for(self.experiment.seed, "matching", plan.round, k)
            tensors, assigns = match_layer(uploads, layer, self.cfg, seed, self._outgoing(k), k == 0)
            L = n_units(tensors, layer)
            uploads = [permute_next_input(u, layer, a, L) for u, a in zip(uploads, assigns)]
            matched.append(tensors)
        params, widths = self._assemble(matched, uploads, results)
        return ServerState(params=params, algo_state=replace(state.algo_state, widths=widths))
