"""Evaluation of a global model on a test split: accuracy and mean cross-entropy.

Used by the algorithms (each says how its global model is evaluated) and by the engine's round
loop; it lives outside :mod:`fedsim.engine` so that the algorithms do not import the engine.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.data.base import Split


@torch.no_grad()
def evaluate_probs(predict, split: Split, batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy in nats) of class probabilities ``predict(x)``
    ((B, K) float, rows summing to 1) over every example of ``split``."""
    correct, loss, n = 0, 0.0, len(split)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        x = torch.from_numpy(split.inputs(idx))
        y = torch.from_numpy(split.y[idx])
        probs = predict(x)
        loss += float(F.nll_loss(torch.log(probs.clamp_min(1e-12)), y, reduction="sum"))
        correct += int((probs.argmax(1) == y).sum())
    return correct / max(n, 1), loss / max(n, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy in nats) of ``model`` over every example of ``split``."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss, n = 0, 0.0, len(split)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        x = torch.from_numpy(split.inputs(idx)).to(device)
        y = torch.from_numpy(split.y[idx]).to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return correct / max(n, 1), loss / max(n, 1)
