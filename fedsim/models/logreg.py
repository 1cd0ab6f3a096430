"""Multinomial logistic regression for Synthetic(alpha, beta), the FedProx paper's convex model.

Source: Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx), MLSys 2020,
section 5.1: a multinomial logistic regression on the 60-feature, 10-class synthetic data. One
linear layer ``fc`` 60 -> num_classes; softmax is in the loss (cross-entropy). 610 parameters for
10 classes, 600 multiply-accumulates per example.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.models._common import (
    weight_bias_groups,
)
from fedsim.models.base import FedModel, LayerGroup, MatchLayer


class LogReg(FedModel):
    """Logits = x W^T + b.

    Input ``(B, 60)`` float32; output ``(B, num_classes)`` float32 logits.

    Args:
        num_classes: output classes (>= 2).
        widths: no hidden layers, so only None or ``{}``.
        generator: CPU generator the parameters are drawn from (PyTorch's default Linear
            distribution U(-1/sqrt(60), 1/sqrt(60))); None uses a generator seeded with 0.

    Raises:
        FedsimError: bad ``num_classes``, any ``widths`` key, or a bad ``generator``.
    """

    NAME = "logreg"
    INPUT_SHAPE = (60,)
    input_dtype = torch.float32
    DEFAULT_WIDTHS: dict[str, int] = {}

    def build(self, generator: torch.Generator) -> None:
        self.fc = nn.Linear(self.INPUT_SHAPE[0], self.num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` can be fed to this model: only ``(60,)``."""
        return tuple(input_shape) == cls.INPUT_SHAPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 60) float32 -> logits (B, num_classes) float32."""
        return self.fc(x)

    def layer_groups(self) -> list[LayerGroup]:
        """One group, ``fc`` (weight and bias)."""
        return weight_bias_groups(("fc",))

    def match_layers(self) -> list[MatchLayer]:
        """None: the only layer is the classifier, which FedMA averages by class, never matches."""
        return []

    def classifier(self) -> tuple[str, str]:
        """``("fc.weight", "fc.bias")``."""
        return ("fc.weight", "fc.bias")
