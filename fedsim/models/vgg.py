"""VGG-9 for CIFAR without BatchNorm, as used by FedMA (Wang et al., ICLR 2020, section 4;
the authors' ``ModerateCNN``).

Architecture (default widths): conv1 3->32, conv2 32->64, maxpool, conv3 64->128, conv4 128->128,
maxpool, [Dropout2d 0.05], conv5 128->256, conv6 256->256, maxpool (all 3x3, padding 1, each
followed by ReLU), channel-major flatten 256*4*4 = 4096, [Dropout 0.1], fc1 4096->512, ReLU,
fc2 512->512, ReLU, [Dropout 0.1], fc3 512->num_classes; 3,491,530 parameters for 10 classes.

Dropout (bracketed) follows the authors' code and is on by default (``dropout=False`` removes it).
Dropout has no parameters, so it changes neither the state_dict nor FedMA's matching; in training
mode it draws from torch's global RNG, so whoever trains the model decides how that RNG is seeded.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models._common import (
    weight_bias_groups,
)
from fedsim.models.base import FedModel, LayerGroup, MatchLayer

_CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6")
_POOL_AFTER = frozenset({"conv2", "conv4", "conv6"})


class VGG9(FedModel):
    """VGG-9 (no BatchNorm) of FedMA's CIFAR-10 experiments.

    Input ``(B, 3, 32, 32)`` float32; output ``(B, num_classes)`` float32 logits.

    Args:
        num_classes: output classes (>= 2).
        widths: overrides of ``{"conv1": 32, "conv2": 64, "conv3": 128, "conv4": 128,
            "conv5": 256, "conv6": 256, "fc1": 512, "fc2": 512}`` (any subset).
        generator: CPU generator every parameter is drawn from (PyTorch's default
            distributions); None uses a generator seeded with 0. The global RNG is never touched.
        dropout: keep the authors' dropout (Dropout2d 0.05 after the second pooling, Dropout 0.1
            before fc1 and before fc3).

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
    """

    NAME = "vgg9"
    INPUT_SHAPE = (3, 32, 32)
    input_dtype = torch.float32
    DEFAULT_WIDTHS = {
        "conv1": 32,
        "conv2": 64,
        "conv3": 128,
        "conv4": 128,
        "conv5": 256,
        "conv6": 256,
        "fc1": 512,
        "fc2": 512,
    }
    _SPATIAL_AFTER_CONV6 = 4 * 4  # 32 -pool-> 16 -pool-> 8 -pool-> 4

    def __init__(
        self,
        num_classes: int = 10,
        widths: dict[str, int] | None = None,
        generator: torch.Generator | None = None,
        dropout: bool = True,
    ) -> None:
        super().__init__(num_classes, widths, generator)
        self.dropout = bool(dropout)

    def build(self, generator: torch.Generator) -> None:
        w = self.widths
        c_in = 3
        for name in _CONVS:
            setattr(self, name, nn.Conv2d(c_in, w[name], 3, padding=1))
            c_in = w[name]
        self.fc1 = nn.Linear(w["conv6"] * self._SPATIAL_AFTER_CONV6, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], w["fc2"])
        self.fc3 = nn.Linear(w["fc2"], self.num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` can be fed to this model."""
        return tuple(input_shape) == cls.INPUT_SHAPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, 32, 32) float32 -> logits (B, num_classes) float32."""
        drop = self.dropout and self.training
        for name in _CONVS:  # spatial 32 -> 16 (conv2) -> 8 (conv4) -> 4 (conv6)
            x = F.relu(getattr(self, name)(x))
            if name in _POOL_AFTER:
                x = F.max_pool2d(x, 2)
            if name == "conv4":
                x = F.dropout2d(x, 0.05, drop)
        x = x.flatten(1)  # (B, conv6*16), channel-major
        x = F.dropout(x, 0.1, drop)
        x = F.relu(self.fc1(x))  # (B, fc1)
        x = F.relu(self.fc2(x))  # (B, fc2)
        x = F.dropout(x, 0.1, drop)
        return self.fc3(x)

    def layer_groups(self) -> list[LayerGroup]:
        """conv1..conv6, fc1, fc2, fc3: each the layer's weight and bias."""
        return weight_bias_groups((*_CONVS, "fc1", "fc2", "fc3"))

    def match_layers(self) -> list[MatchLayer]:
        """conv1..conv5 -> next conv (block 1), conv6 -> fc1 (block 16 = 4x4 map),
        fc1 -> fc2, fc2 -> fc3 (block 1)."""
        layers = [
            MatchLayer(name, "conv2d", f"{name}.weight", f"{name}.bias", f"{nxt}.weight", 1)
            for name, nxt in itertools.pairwise(_CONVS)
        ]
        layers.append(
            MatchLayer(
                "conv6",
                "conv2d",
                "conv6.weight",
                "conv6.bias",
                "fc1.weight",
                self._SPATIAL_AFTER_CONV6,
            )
        )
        layers.append(MatchLayer("fc1", "linear", "fc1.weight", "fc1.bias", "fc2.weight", 1))
        layers.append(MatchLayer("fc2", "linear", "fc2.weight", "fc2.bias", "fc3.weight", 1))
        return layers

    def classifier(self) -> tuple[str, str]:
        """``("fc3.weight", "fc3.bias")``."""
        return ("fc3.weight", "fc3.bias")
