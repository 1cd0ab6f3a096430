"""LeNet for MNIST as used by FedMA (Wang et al., ICLR 2020, section 4; authors' ``LeNet``).

Architecture (default widths): conv1 1->20 5x5, ReLU, maxpool 2, conv2 20->50 5x5, ReLU,
maxpool 2, channel-major flatten 50*4*4 = 800, fc1 800->500, ReLU, fc2 500->num_classes;
431,080 parameters for 10 classes.

Two models: ``lenet`` keeps the ReLU after fc1 (the usual LeNet); ``lenet_fedma`` is the network
exactly as the FedMA authors' code defines it (IBM/FedMA ``model.py``, ``LeNet`` lines 202-220 and
``LeNetContainer`` lines 223-242): each conv is followed by max-pooling and then ReLU (the same
values as ReLU then pooling), and fc1 feeds fc2 with NO nonlinearity in between. The parameters,
their names and the matchable layers are the same in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models._common import (
    weight_bias_groups,
)
from fedsim.models.base import FedModel, LayerGroup, MatchLayer


class LeNet(FedModel):
    """LeNet-5 variant of FedMA's MNIST experiments.

    Input ``(B, 1, 28, 28)`` float32; output ``(B, num_classes)`` float32 logits.

    Args:
        num_classes: output classes (>= 2).
        widths: overrides of ``{"conv1": 20, "conv2": 50, "fc1": 500}`` (any subset).
        generator: CPU generator every parameter is drawn from (PyTorch's default
            distributions); None uses a generator seeded with 0. The global RNG is never touched.

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
    """

    NAME = "lenet"
    INPUT_SHAPE = (1, 28, 28)
    input_dtype = torch.float32
    DEFAULT_WIDTHS = {"conv1": 20, "conv2": 50, "fc1": 500}
    _SPATIAL_AFTER_CONV2 = 4 * 4  # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4

    def build(self, generator: torch.Generator) -> None:
        w = self.widths
        self.conv1 = nn.Conv2d(1, w["conv1"], 5)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 5)
        self.fc1 = nn.Linear(w["conv2"] * self._SPATIAL_AFTER_CONV2, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], self.num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` can be fed to this model."""
        return tuple(input_shape) == cls.INPUT_SHAPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, 28, 28) float32 -> logits (B, num_classes) float32."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, conv1, 12, 12)
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


class LeNetFedMA(LeNet):
    """LeNet exactly as the FedMA authors' code defines it: no ReLU between fc1 and fc2.

    IBM/FedMA ``model.py``, ``LeNet`` (lines 202-220) and ``LeNetContainer`` (lines 223-242, the
    class their matching code builds at the matched widths): conv1, max-pool 2, ReLU, conv2,
    max-pool 2, ReLU, flatten, fc1, fc2. Same parameters, widths and matchable layers as
    :class:`LeNet`; input ``(B, 1, 28, 28)`` float32, output ``(B, num_classes)`` float32 logits.
    """

    NAME = "lenet_fedma"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 1, 28, 28) float32 -> logits (B, num_classes) float32."""
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (B, conv1, 12, 12)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (B, conv2, 4, 4)
        return self.fc2(self.fc1(x.flatten(1)))  # fc1 is affine: no ReLU, as the authors'
