"""Batched data augmentation on the worker's device, driven by a per-(round, client) generator."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def cifar_augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Reflect-pad by ``pad``, random crop back to H x W, random horizontal flip (FedMA's CIFAR-10
    recipe, docs/algorithms.md section 7), for a whole batch at once.

    Args:
        x: ``(B, C, H, W)`` float images on any device.
        generator: CPU torch generator; offsets and flips are drawn from it, so the result is a
            pure function of the batch and the generator state.

    Returns:
        ``(B, C, H, W)`` tensor on ``x``'s device.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def augmenter(kind: str | None, generator: torch.Generator | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch transform for a dataset's ``augment`` flag (identity when None, which needs no
    ``generator``).

    Raises:
        ValueError: unknown ``kind``, or a ``kind`` without a generator.
    """
    if kind is None:
        return lambda x: x
    if generator is None:
        raise ValueError(f"augmentation {kind!r} needs a generator")
    if kind == "cifar":
        return lambda x: cifar_augment(x, generator)
    raise ValueError(f"unknown augmentation {kind!r}")
