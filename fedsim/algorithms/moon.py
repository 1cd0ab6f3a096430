"""MOON, model-contrastive federated learning (Li, He, Song, CVPR 2021), docs/algorithms.md section 1.

The model is encoder -> projection head -> classifier on the projection z (fedsim's ``moon_cnn``
or any ``<model>+moon``). The local loss is CE + mu * l_con with (paper eq. 3)

    l_con = -log( exp(cos(z, z_glob)/tau) / (exp(cos(z, z_glob)/tau) + exp(cos(z, z_prev)/tau)) )

where z_glob comes from the frozen global model the client received and z_prev from the client's
own model at the end of its previous local training (frozen; both in eval mode). The previous
model is client state kept by the engine's store; in a client's first participation there is no
negative and l_con = 0. Under ``init: independent`` round 0 receives no global model (every client
trains its own initialisation, FedMA App. A; IBM/FedMA main.py ``local_train``), so there is no
positive either and l_con = 0 too; its trained model still becomes the client's previous model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedsim import params as P
from fedsim.algorithms.base import Algorithm, ClientContext, ClientState, StackedContext
from fedsim.algorithms.registry import register
from fedsim.config import ExperimentConfig, MoonConfig, RunConfig
from fedsim.errors import FedsimError


def contrastive_terms(
    z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float
) -> torch.Tensor:
    """MOON's model-contrastive loss l_con (Li et al. 2021, eq. 3) of each example.

    Args:
        z, z_glob, z_prev: ``(B, P)`` float projections of the local, global and previous model.
        tau: temperature > 0.

    Returns:
        ``(B,)``: -log softmax([cos(z, z_glob), cos(z, z_prev)] / tau)[0] per example.
    """
    pos = F.cosine_similarity(z, z_glob, dim=1) / tau  # (B,)
    neg = F.cosine_similarity(z, z_prev, dim=1) / tau  # (B,)
    return torch.logsumexp(torch.stack([pos, neg], 1), 1) - pos


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float) -> torch.Tensor:
    """l_con averaged over the batch (:func:`contrastive_terms`); a 0-dim tensor."""
    return contrastive_terms(z, z_glob, z_prev, tau).mean()


def _frozen(model: torch.nn.Module, weights: dict | None = None) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    if weights is not None:
        device = next(model.parameters()).device
        twin.load_state_dict({k: v.to(device) for k, v in P.from_numpy(weights).items()})
    twin.eval()
    for w in twin.parameters():
        w.requires_grad_(False)
    return twin


def needs_projection_head(algorithm: Algorithm) -> None:
    """Raises FedsimError when the experiment's model cannot return MOON's projection z."""
    if not hasattr(algorithm.reference_model(), "features"):
        name = algorithm.experiment.model.name
        raise FedsimError(
            f"MOON needs a model with a projection head; set model.name: {name}+moon (or moon_cnn for CIFAR)"
        )


@dataclass
class MoonClientState(ClientState):
    """A MOON client's stored state: ``prev``, its model after its last local update
    (state_dict key -> array), the negative of the contrastive loss (paper eq. 2)."""

    prev: dict[str, Any] | None = None


@register
class MOON(Algorithm):
    """FedAvg with MOON's contrastive local loss; clients keep their previous model."""

    name = "moon"
    model_suffix = "+moon"
    ClientStateType = MoonClientState
    full_network = True  # the contrastive term changes local training, not the traffic
    Config = MoonConfig
    keeps_client_state = True
    frozen_forwards = 2  # z_glob and z_prev: each a full forward pass of a frozen model
    vectorizable = True

    def __init__(
        self,
        cfg: RunConfig,
        experiment: ExperimentConfig,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__(cfg, experiment, num_classes, input_shape)
        if num_classes is not None:
            needs_projection_head(self)

    def local_update(self, ctx: ClientContext) -> tuple[P.Params, float]:
        """Local training with CE + mu * l_con; sets the client's new previous model (its state).

        l_con needs both a received global model (``ctx.received`` non-empty; empty in round 0
        under ``init: independent``, when the model holds the client's own initialisation) and a
        previous model (``ctx.state.prev``; no state in a first participation); without either
        it is 0 and no frozen forward pass is counted (nothing received: no frozen model is built).
        """
        prev = ctx.state.prev if ctx.state is not None else None
        if ctx.received:
            ctx.aux["glob"] = _frozen(ctx.model)  # the received global model, before any local step
            if prev is not None:
                ctx.aux["prev"] = _frozen(ctx.model, prev)
                ctx.frozen_forwards = self.frozen_forwards
        upload, loss = super().local_update(ctx)
        self.new_client_state(ctx).prev = P.to_numpy(ctx.model.state_dict())
        return upload, loss

    def batch_loss(self, ctx: ClientContext, x: torch.Tensor, y: torch.Tensor):
        logits, z = ctx.model(x, return_projection=True)
        ce = F.cross_entropy(logits, y)
        if "prev" not in ctx.aux or "glob" not in ctx.aux:  # no negative or no positive: l_con = 0
            return ce, ce
        with torch.no_grad():
            z_glob = ctx.aux["glob"](x, return_projection=True)[1]
            z_prev = ctx.aux["prev"](x, return_projection=True)[1]
        return ce + self.cfg.mu * contrastive_loss(z, z_glob, z_prev, self.cfg.tau), ce

    # ---- stacked local update (fedsim.engine.vectorize)
    def stacked_begin(self, sctx: StackedContext, states: list[Any]) -> dict[str, torch.Tensor]:
        """Per-client tensors, each stacked on a leading client axis K:

        * ``"prev:" + key`` ``(K, *shape)``: each client's previous model;
        * ``"glob:" + key``: each client's own BatchNorm statistics for the frozen global model,
          under ``bn_stats: local`` only;
        * ``"has_prev"`` ``(K,)`` float: 1 for a returning client, 0 for a first participation,
          whose l_con is multiplied by 0 (its previous model is a placeholder: the received one).

        Empty when no client of the stack has a previous model."""
        prevs = [s.prev if s is not None else None for s in states]
        if all(p is None for p in prevs):
            return {}
        keys = list(sctx.model.state_dict())
        device = sctx.received[keys[0]].device
        rows = [sctx.received if p is None else P.from_numpy(p) for p in prevs]
        aux = {"prev:" + k: torch.stack([r[k].to(device) for r in rows]) for k in keys}
        if self.keeps_bn_local:  # the frozen global model carries each client's own statistics
            own = [sctx.received if s is None or s.bn is None else P.from_numpy(s.bn) for s in states]
            for k in self.bn_keys:
                aux["glob:" + k] = torch.stack([o[k].to(device) for o in own])
        aux["has_prev"] = torch.tensor([float(p is not None) for p in prevs], device=device)
        return aux

    def stacked_loss(self, sctx, tensors, x, y, w, aux):
        """CE + mu * has_prev * l_con, both weighted means over the real examples; z_glob and
        z_prev come from frozen forward passes in eval mode, as on the per-client path."""
        from torch.func import functional_call

        model = sctx.model
        logits, z = functional_call(model, tensors, (x,), {"return_projection": True})
        ce = (F.cross_entropy(logits, y, reduction="none") * w).sum()
        if not aux:  # no client of the stack has a previous model: l_con = 0 for all
            return ce, ce
        prev = {k[len("prev:") :]: v for k, v in aux.items() if k.startswith("prev:")}
        glob = {k: aux.get("glob:" + k, sctx.received[k]) for k in prev}
        model.eval()
        try:
            with torch.no_grad():
                z_glob = functional_call(model, glob, (x,), {"return_projection": True})[1]
                z_prev = functional_call(model, prev, (x,), {"return_projection": True})[1]
        finally:
            model.train()
        l_con = (contrastive_terms(z, z_glob, z_prev, self.cfg.tau) * w).sum()
        return ce + self.cfg.mu * aux["has_prev"] * l_con, ce

    def stacked_finish(self, sctx, task, state, final, steps):
        """The upload, the client's final model as its new previous model, and 2 frozen forward
        passes for a returning client (0 for a first participation)."""
        upload, new_state, _ = super().stacked_finish(sctx, task, state, final, steps)
        new_state = new_state or self.client_state_type()()
        new_state.prev = P.to_numpy(final)
        returning = state is not None and state.prev is not None
        return upload, new_state, self.frozen_forwards if returning else 0
