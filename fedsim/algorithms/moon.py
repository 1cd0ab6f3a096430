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
from fedsim.algorithms.base import Algorithm, ClientContext, ClientState
from fedsim.algorithms.registry import register
from fedsim.config import ExperimentConfig, MoonConfig, RunConfig
from fedsim.errors import FedsimError


def contrastive_loss(z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, tau: float) -> torch.Tensor:
    """MOON's model-contrastive loss l_con (Li et al. 2021, eq. 3), averaged over the batch.

    Args:
        z, z_glob, z_prev: ``(B, P)`` float projections of the local, global and previous model.
        tau: temperature > 0.

    Returns:
        0-dim tensor: mean over the batch of -log softmax([cos(z, z_glob), cos(z, z_prev)] / tau)[0].
    """
    pos = F.cosine_similarity(z, z_glob, dim=1) / tau  # (B,)
    neg = F.cosine_similarity(z, z_prev, dim=1) / tau  # (B,)
    return (torch.logsumexp(torch.stack([pos, neg], 1), 1) - pos).mean()


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
