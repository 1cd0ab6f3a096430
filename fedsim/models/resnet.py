"""ResNet-8 and ResNet-18 with BatchNorm, as FedPart used them (Wang et al., "Why Go Full?
Elevating Federated Learning Through Partial Network Updates", NeurIPS 2024, section 5; He et al.,
"Deep Residual Learning for Image Recognition", CVPR 2016, for the blocks).

Both are torchvision-style ImageNet ResNets applied unchanged to small images: a 7x7 stride-2 stem
convolution (no bias) with BatchNorm and ReLU, a 3x3 stride-2 max-pool, stages of BasicBlocks
(two 3x3 convolutions without bias, each followed by BatchNorm; the first block of every stage after
the first has stride 2 and a 1x1 stride-2 convolution + BatchNorm on its shortcut), global average
pooling and a linear classifier.

* ResNet-8: three stages of ONE block, 64/128/256 channels; 1,235,274 parameters for 10 classes
  (arithmetic in :class:`ResNet8`). For a 3x32x32 image the feature maps are 64x16x16 after the
  stem, 64x8x8 after the pool and stage 1, 128x4x4 after stage 2 and 256x2x2 after stage 3.
* ResNet-18: four stages of two blocks, 64/128/256/512 channels (torchvision's ``resnet18``, same
  state_dict keys and shapes); 11,181,642 parameters for 10 classes.

Layer groups (FedPart): the stem convolution with its BatchNorm, then per block ``conv1`` (+``bn1``),
``conv2`` (+``bn2``) and, where present, ``downsample`` (1x1 conv + BN), then ``fc``: 1 + 2*3 + 2 + 1
= 10 groups for ResNet-8 and 1 + 2*8 + 3 + 1 = 21 for ResNet-18. A BatchNorm's group holds its
``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``.

FedMA matching is not defined for BatchNorm/residual networks (a permutation of a block's output
channels would have to be shared by every layer writing into the same residual stream):
``match_layers()`` returns ``[]``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models._common import (
    uniform_,
)
from fedsim.models.base import FedModel, LayerGroup, MatchLayer

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _conv_bn_group(name: str, conv: str, bn: str) -> LayerGroup:
    """The group ``name``: the conv's weight (no bias) and every BatchNorm state_dict entry."""
    return LayerGroup(name, (f"{conv}.weight", *(f"{bn}.{k}" for k in _BN_KEYS)))


class BasicBlock(nn.Module):
    """He et al. (2016) basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, ReLU.

    Input ``(B, c_in, H, W)`` float32; output ``(B, c_out, ceil(H/stride), ceil(W/stride))``.
    The shortcut is the identity, or a 1x1 convolution with ``stride`` + BatchNorm
    (``downsample``) when the stride is not 1 or the channel count changes (torchvision's rule).
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, c_in, H, W) -> (B, c_out, H', W')."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class _ResNet(FedModel):
    """Shared body of :class:`ResNet8` and :class:`ResNet18` (see the module docstring).

    Subclasses set ``NAME``, ``BLOCKS`` (blocks per stage) and ``DEFAULT_WIDTHS`` (one key per
    stage, ``layer1`` .. ``layerS``: its output channels; the stem outputs ``layer1`` channels).
    """

    NAME: ClassVar[str]
    BLOCKS: ClassVar[tuple[int, ...]]
    DEFAULT_WIDTHS: ClassVar[dict[str, int]]
    INPUT_SHAPE = (3, 32, 32)
    input_dtype = torch.float32
    _MIN_SIDE = 32

    def build(self, generator: torch.Generator) -> None:
        stage_widths = [self.widths[f"layer{s}"] for s in range(1, len(self.BLOCKS) + 1)]
        self.conv1 = nn.Conv2d(3, stage_widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = stage_widths[0]
        for s, (n_blocks, c_out) in enumerate(zip(self.BLOCKS, stage_widths), start=1):
            blocks = []
            for b in range(n_blocks):
                stride = 2 if (s > 1 and b == 0) else 1
                blocks.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, self.num_classes)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """torchvision's ResNet initialisation, every draw from ``generator`` in registration order:
        conv weights ~ N(0, 2 / (C_out * kh * kw)) (He et al. 2015, fan-out mode), BatchNorm
        weight 1 and bias 0, fc weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch default)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                uniform_(m.weight, bound, generator)
                uniform_(m.bias, bound, generator)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` fit: RGB images ``(3, H, W)`` with H, W >= 32
        (CIFAR's 32x32, TinyImageNet's 64x64; global average pooling takes any larger size)."""
        shape = tuple(input_shape)
        return len(shape) == 3 and shape[0] == 3 and min(shape[1:]) >= cls._MIN_SIDE

    def stages(self) -> list[nn.Sequential]:
        """The residual stages ``layer1`` .. ``layerS`` in forward order."""
        return [getattr(self, f"layer{s}") for s in range(1, len(self.BLOCKS) + 1)]

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) float32 -> pooled features (B, widths[last stage]) float32."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, layer1, H/4, W/4)
        for stage in self.stages():
            x = stage(x)  # stride 2 from stage 2 on
        return self.avgpool(x).flatten(1)  # (B, C_last, 1, 1) -> (B, C_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, H, W) float32 -> logits (B, num_classes) float32."""
        return self.fc(self._trunk(x))

    def layer_groups(self) -> list[LayerGroup]:
        """Stem conv+BN, then per block conv1+bn1, conv2+bn2, [downsample conv+BN], then fc;
        shallow to deep, in forward order (a block's shortcut runs after its conv2)."""
        groups = [_conv_bn_group("conv1", "conv1", "bn1")]
        for s, stage in enumerate(self.stages(), start=1):
            for b, block in enumerate(stage):
                p = f"layer{s}.{b}"
                groups.append(_conv_bn_group(f"{p}.conv1", f"{p}.conv1", f"{p}.bn1"))
                groups.append(_conv_bn_group(f"{p}.conv2", f"{p}.conv2", f"{p}.bn2"))
                if block.downsample is not None:
                    groups.append(_conv_bn_group(f"{p}.downsample", f"{p}.downsample.0", f"{p}.downsample.1"))
        groups.append(LayerGroup("fc", ("fc.weight", "fc.bias")))
        return groups

    def match_layers(self) -> list[MatchLayer]:
        """``[]``: FedMA's neuron matching is not defined for BatchNorm/residual networks."""
        return []

    def classifier(self) -> tuple[str, str]:
        """``("fc.weight", "fc.bias")``."""
        return ("fc.weight", "fc.bias")


class ResNet8(_ResNet):
    """ResNet-8 of FedPart (10 layer groups).

    Input ``(B, 3, H, W)`` float32 with H, W >= 32; output ``(B, num_classes)`` float32 logits.

    Parameters for 10 classes (convolutions have no bias; BatchNorm has weight + bias):
    stem conv 3*64*7*7 = 9,408 + BN 128; stage 1 conv 64*64*9 = 36,864 twice + BN 128 twice
    = 73,984; stage 2 conv 64*128*9 = 73,728 + conv 128*128*9 = 147,456 + shortcut 64*128 = 8,192
    + 3 BN of 256 = 230,144; stage 3 conv 128*256*9 = 294,912 + conv 256*256*9 = 589,824
    + shortcut 128*256 = 32,768 + 3 BN of 512 = 919,040; fc 256*10 + 10 = 2,570;
    total 9,536 + 73,984 + 230,144 + 919,040 + 2,570 = 1,235,274.

    Args:
        num_classes: output classes (>= 2).
        widths: overrides of ``{"layer1": 64, "layer2": 128, "layer3": 256}`` (output channels
            of each stage; the stem outputs ``layer1`` channels).
        generator: CPU generator every random tensor is drawn from; None uses a generator
            seeded with 0. The global RNG is never touched.

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
    """

    NAME = "resnet8"
    BLOCKS = (1, 1, 1)
    DEFAULT_WIDTHS = {"layer1": 64, "layer2": 128, "layer3": 256}


class ResNet18(_ResNet):
    """ResNet-18 (torchvision's ``resnet18`` layout; 21 layer groups).

    Input ``(B, 3, H, W)`` float32 with H, W >= 32; output ``(B, num_classes)`` float32 logits.
    11,181,642 parameters for 10 classes.

    Args:
        num_classes: output classes (>= 2).
        widths: overrides of ``{"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}``.
        generator: CPU generator every random tensor is drawn from; None uses a generator
            seeded with 0. The global RNG is never touched.

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
    """

    NAME = "resnet18"
    BLOCKS = (2, 2, 2, 2)
    DEFAULT_WIDTHS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
