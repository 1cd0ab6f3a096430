"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

The local objective adds (mu/2) ||w - w_global||^2 (paper eq. 2) summed over every trainable tensor,
with w_global frozen for the round. The norm is squared and the term carries the gradient
mu (w - w_global); public implementations have shipped it unsquared or computed on ``.data``
(no gradient), which is why both properties are pinned by tests.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedsim.algorithms.base import ClientContext
from fedsim.algorithms.fedavg import FedAvg
from fedsim.algorithms.registry import register
from fedsim.config import FedProxConfig


def proximal_term(
    named: Iterable[tuple[str, torch.Tensor]], anchor: dict[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """(mu / 2) * sum_t ||w_t - a_t||_2^2 over the given trainable tensors (FedProx eq. 2).

    Args:
        named: (name, parameter) pairs, parameters with ``requires_grad``; any shapes, float.
        anchor: name -> frozen global tensor of the same shape (no gradient flows into it).
        mu: proximal coefficient (>= 0).

    Returns:
        A 0-dim tensor whose gradient w.r.t. each w_t is mu * (w_t - a_t).
    """
    terms = [(w - anchor[k].detach()).pow(2).sum() for k, w in named]
    if not terms:
        return torch.zeros(())
    return 0.5 * mu * torch.stack(terms).sum()


@register
class FedProx(FedAvg):
    """FedAvg whose local loss adds the proximal term; aggregation unchanged."""

    name = "fedprox"
    Config = FedProxConfig
    vectorizable = True  # stacked_loss adds the same proximal term

    def batch_loss(self, ctx: ClientContext, x, y):
        objective, ce = super().batch_loss(ctx, x, y)
        trainable = [(k, w) for k, w in ctx.model.named_parameters() if w.requires_grad]
        return objective + proximal_term(trainable, ctx.received, self.cfg.mu), ce

    def stacked_loss(self, sctx, tensors, x, y, w, aux):
        """The weighted cross-entropy plus the client's proximal term over the trainable tensors
        (one client of a stacked local update, under ``vmap``)."""
        objective, ce = super().stacked_loss(sctx, tensors, x, y, w, aux)
        trainable = [(k, tensors[k]) for k in sctx.trainable]
        return objective + proximal_term(trainable, sctx.received, self.cfg.mu), ce
