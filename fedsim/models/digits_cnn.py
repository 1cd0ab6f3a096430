"""A small CNN for the 8x8 sklearn digits, fedsim's offline stand-in for MNIST.

Not from a paper: a LeNet-shaped network (LeCun et al., 1998) scaled to 8x8 inputs so that
every algorithm, FedMA included, can run end to end in seconds on a laptop. Architecture
(default widths): conv1 1->16 3x3 pad 1, ReLU, conv2 16->32 3x3 pad 1, ReLU, maxpool 2,
channel-major flatten 32*4*4 = 512, fc1 512->64, ReLU, fc2 64->num_classes; 38,282 parameters
for 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models._common import (
    weight_bias_groups,
)
from fedsim.models.base import FedModel, LayerGroup, MatchLayer


class DigitsCNN(FedModel):
    """Two 3x3 convs, one pooling, two linear layers.

    Input ``(B, 1, 8, 8)`` float32; output ``(B, num_classes)`` float32 logits.

    Args:
        num_classes: output classes (>= 2).
        widths: overrides of ``{"conv1": 16, "conv2": 32, "fc1": 64}`` (any subset).
        generator: CPU generator every parameter is drawn from (PyTorch's default
            distributions); None uses a generator seeded with 0. The global RNG is never touched.

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
    """

    NAME = "digits_cnn"
    INPUT_SHAPE = (1, 8, 8)
    input_dtype = torch.float32
    DEFAULT_WIDTHS = {"conv1": 16, "conv2": 32, "fc1": 64}
    _SPATIAL_AFTER_CONV2 = 4 * 4  # 8 -conv(pad 1)-> 8 -conv(pad 1)-> 8 -pool-> 4

    def build(self, generator: torch.Generator) -> None:
        w = self.widths
        self.conv1 = nn.Conv2d(1, w["conv1"], 3, padding=1)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 3, padding=1)
        self.fc1 = nn.Linear(w["conv2"] * self._SPATIAL_AFTER_CONV2, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], self.num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` can be fed to this model."""
        return tuple(input_shape) == cls.INPUT_SHAPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, 8, 8) float32 -> logits (B, num_classes) float32."""
        x = F.relu(self.conv1(x))  # (B, conv1, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, conv2, 4, 4)
        x = x.flatten(1)  # (B, conv2*16), channel-major
        x = F.relu(self.fc1(x))  # (B, fc1)
        return self.fc2(x)

    def layer_groups(self) -> list[LayerGroup]:
        """conv1, conv2, fc1, fc2: each the layer's weight and bias."""
        return weight_bias_groups(("conv1", "conv2", "fc1", "fc2"))

    def match_layers(self) -> list[MatchLayer]:
        """conv1 -> conv2 (block 1), conv2 -> fc1 (block 16 = 4x4 map), fc1 -> fc2 (block 1)."""
        return [
            MatchLayer("conv1", "conv2d", "conv1.weight", "conv1.bias", "conv2.weight", 1),
            MatchLayer(
                "conv2",
                "conv2d",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                self._SPATIAL_AFTER_CONV2,
            ),
            MatchLayer("fc1", "linear", "fc1.weight", "fc1.bias", "fc2.weight", 1),
        ]

    def classifier(self) -> tuple[str, str]:
        """``("fc2.weight", "fc2.bias")``."""
        return ("fc2.weight", "fc2.bias")
