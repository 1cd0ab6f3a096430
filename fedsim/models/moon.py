"""MOON's model shape: encoder -> projection head -> classifier on the projection (Li, He, Song,
"Model-Contrastive Federated Learning", CVPR 2021, section 3.2 and 4.1; docs/algorithms.md section 1).

The encoder maps an example to a representation h of size d; the projection head is
Linear(d, d) -> ReLU -> Linear(d, 256) and gives z, the vector MOON's contrastive loss compares; the
classifier is Linear(256, num_classes) on z.

* ``moon_cnn`` (:class:`MoonCNN`): MOON's CIFAR network. Encoder = conv 3->6 5x5, ReLU, max-pool 2,
  conv 6->16 5x5, ReLU, max-pool 2, channel-major flatten 16*5*5 = 400, fc1 400->120, ReLU,
  fc2 120->84, ReLU (d = 84); for 3x32x32 inputs.
* ``<base>+moon`` (:func:`with_projection_head`): any registered fedsim model with its classifier
  removed is the encoder, and the classifier's input (the model's penultimate features) is h.
  E.g. ``resnet8+moon`` (d = 256), ``digits_cnn+moon`` (d = 64), ``lenet+moon`` (d = 500).

Widths: the encoder's keys plus ``projection`` (size of z, default 256); the head's hidden layer
always has d units, as in MOON. Layer groups: the encoder's groups (prefixed ``encoder.``, its
classifier's group dropped), then ``proj1``, ``proj2``, then the classifier ``fc``. FedMA matching is
not offered for these models: ``match_layers()`` returns ``[]``.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import FedsimError
from fedsim.models._common import (
    init_torch_default,
    weight_bias_groups,
)
from fedsim.models.base import FedModel, LayerGroup, MatchLayer

#: Size of MOON's projection z (Li et al. 2021, section 4.1: "output dimension 256").
PROJECTION_DIM = 256
#: Suffix of a model name that puts MOON's projection head on a registered model.
MOON_SUFFIX = "+moon"


class SimpleCNN(FedModel):
    """MOON's simple CIFAR CNN with a plain classifier: the encoder of :class:`MoonCNN`.

    Not registered as a model of its own. Input ``(B, 3, 32, 32)`` float32; output
    ``(B, num_classes)`` float32 logits (fc3 84->num_classes on the encoder's (B, 84)).

    Args:
        num_classes: output classes (>= 2).
        widths: overrides of ``{"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}``.
        generator: CPU generator every parameter is drawn from (PyTorch's default
            distributions); None uses a generator seeded with 0. The global RNG is never touched.

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
    """

    NAME = "simple_cnn"
    INPUT_SHAPE = (3, 32, 32)
    input_dtype = torch.float32
    DEFAULT_WIDTHS = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    _SPATIAL_AFTER_CONV2 = 5 * 5  # 32 -conv5-> 28 -pool-> 14 -conv5-> 10 -pool-> 5

    def build(self, generator: torch.Generator) -> None:
        w = self.widths
        self.conv1 = nn.Conv2d(3, w["conv1"], 5)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 5)
        self.fc1 = nn.Linear(w["conv2"] * self._SPATIAL_AFTER_CONV2, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], w["fc2"])
        self.fc3 = nn.Linear(w["fc2"], self.num_classes)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` can be fed to this model."""
        return tuple(input_shape) == cls.INPUT_SHAPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, 32, 32) float32 -> logits (B, num_classes) float32."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, conv1, 14, 14)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, conv2, 5, 5)
        x = x.flatten(1)  # (B, conv2*25), channel-major
        x = F.relu(self.fc1(x))  # (B, fc1)
        x = F.relu(self.fc2(x))  # (B, fc2): MOON's representation h
        return self.fc3(x)

    def layer_groups(self) -> list[LayerGroup]:
        """conv1, conv2, fc1, fc2, fc3: each the layer's weight and bias."""
        return weight_bias_groups(("conv1", "conv2", "fc1", "fc2", "fc3"))

    def match_layers(self) -> list[MatchLayer]:
        """``[]``: only used as MOON's encoder, for which FedMA is not offered."""
        return []

    def classifier(self) -> tuple[str, str]:
        """``("fc3.weight", "fc3.bias")``."""
        return ("fc3.weight", "fc3.bias")


class ProjectionHeadModel(FedModel):
    """Encoder -> projection head (Linear d->d, ReLU, Linear d->P) -> classifier Linear P->K.

    Concrete classes come from :func:`with_projection_head` (or are :class:`MoonCNN`); each sets
    ``BASE`` (the encoder's model class), ``NAME``, ``DEFAULT_WIDTHS``, ``input_dtype`` and, where
    the base has one, ``INPUT_SHAPE``.

    Input: what ``BASE`` takes, ``(B, *input_shape)``. ``forward(x)`` gives logits
    ``(B, num_classes)`` float32; :meth:`features` gives z ``(B, P)`` float32 (P = 256 by default).

    Args:
        num_classes: output classes (>= 2).
        widths: overrides of the base's widths and of ``projection`` (P).
        generator: CPU generator every parameter is drawn from: first the encoder's (as the base
            model draws them), then proj1, proj2 and fc (PyTorch's default distributions); None
            uses a generator seeded with 0. The global RNG is never touched.

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
        TypeError: the base model's classifier is not an ``nn.Linear``.
    """

    BASE: ClassVar[type[FedModel]]
    NAME: ClassVar[str]
    DEFAULT_WIDTHS: ClassVar[dict[str, int]]
    input_dtype: ClassVar[torch.dtype] = torch.float32

    def build(self, generator: torch.Generator) -> None:
        """The encoder (``BASE`` without its classifier, its weights drawn from ``generator`` as it
        is built), then the projection head and the classifier."""
        base_widths = {k: v for k, v in self.widths.items() if k != "projection"}
        encoder = self.BASE(num_classes=self.num_classes, widths=base_widths, generator=generator)
        w_key, _b_key = encoder.classifier()
        head_name = w_key.rsplit(".", 1)[0]
        head = encoder.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{self.BASE.__name__}'s classifier {head_name!r} is not nn.Linear")
        d = head.in_features
        # The encoder's groups without the classifier's, taken before the classifier is removed.
        self._encoder_groups = tuple(grp for grp in encoder.layer_groups() if w_key not in grp.tensors)
        parent_name, _, attr = head_name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        setattr(parent, attr, nn.Identity())  # encoder(x) now returns h, (B, d)
        self.encoder = encoder
        p = self.widths["projection"]
        self.proj1 = nn.Linear(d, d)
        self.proj2 = nn.Linear(d, p)
        self.fc = nn.Linear(p, self.num_classes)

    def init_weights(self, generator: torch.Generator) -> None:
        """The head and classifier (the encoder drew its own in :meth:`build`)."""
        for layer in (self.proj1, self.proj2, self.fc):
            init_torch_default(layer, generator)

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` fit (those the encoder's model takes)."""
        return cls.BASE.fits(input_shape)

    def forward(
        self, x: torch.Tensor, return_projection: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, *input_shape) -> logits (B, num_classes) float32, or with
        ``return_projection`` the pair (logits, z) with z (B, P) float32, from one pass."""
        h = self.encoder(x)  # (B, d)
        z = self.proj2(F.relu(self.proj1(h)))  # (B, P)
        logits = self.fc(z)  # (B, num_classes)
        return (logits, z) if return_projection else logits

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, *input_shape) -> MOON's projection z (B, P) float32 (no ReLU after proj2)."""
        h = self.encoder(x)
        return self.proj2(F.relu(self.proj1(h)))

    def layer_groups(self) -> list[LayerGroup]:
        """The encoder's groups (``encoder.`` prefix, classifier dropped), proj1, proj2, fc."""
        encoder = [
            LayerGroup(f"encoder.{grp.name}", tuple(f"encoder.{k}" for k in grp.tensors))
            for grp in self._encoder_groups
        ]
        return encoder + weight_bias_groups(("proj1", "proj2", "fc"))

    def match_layers(self) -> list[MatchLayer]:
        """``[]``: FedMA is not offered for models with a projection head."""
        return []

    def classifier(self) -> tuple[str, str]:
        """``("fc.weight", "fc.bias")``."""
        return ("fc.weight", "fc.bias")


@functools.cache
def _head_class(base: type[FedModel], name: str, class_name: str) -> type[ProjectionHeadModel]:
    """The (cached, hence unique) :class:`ProjectionHeadModel` subclass over ``base``."""
    attrs: dict[str, object] = {
        "BASE": base,
        "NAME": name,
        "DEFAULT_WIDTHS": {**base.DEFAULT_WIDTHS, "projection": PROJECTION_DIM},
        "input_dtype": getattr(base, "input_dtype", torch.float32),
        "__module__": __name__,
        "__qualname__": class_name,
        "__doc__": f"{base.__name__} as encoder, MOON's projection head and a classifier on z "
        f"(model name {name!r}); see :class:`ProjectionHeadModel`.",
    }
    if hasattr(base, "INPUT_SHAPE"):
        attrs["INPUT_SHAPE"] = base.INPUT_SHAPE
    return type(class_name, (ProjectionHeadModel,), attrs)


def with_projection_head(model: str | type[FedModel]) -> type[ProjectionHeadModel]:
    """The model class ``<model>+moon``: ``model`` without its classifier as MOON's encoder,
    then the projection head and a classifier on z (Li et al. 2021, section 3.2).

    Args:
        model: a registered model name (a key of ``fedsim.models.MODELS``) or a FedModel class.

    Returns:
        A :class:`ProjectionHeadModel` subclass taking ``(num_classes, widths, generator)``; the
        same class object for the same ``model``.

    Raises:
        FedsimError: ``model`` is not a registered name, or already has a projection head.
    """
    if isinstance(model, str):
        from fedsim.models import MODELS  # the registry imports this module

        if model not in MODELS:
            raise FedsimError(
                f"cannot add MOON's head to unknown model {model!r}; use one of "
                f"{', '.join(MODELS)} before {MOON_SUFFIX!r}"
            )
        base = MODELS[model]
    else:
        base = model
    if issubclass(base, ProjectionHeadModel):
        raise FedsimError(f"model {base.NAME!r} already has MOON's projection head; drop {MOON_SUFFIX!r}")
    return _head_class(base, f"{base.NAME}{MOON_SUFFIX}", f"{base.__name__}Moon")


def __getattr__(name: str) -> type[ProjectionHeadModel]:
    """``<Base>Moon`` classes made by :func:`with_projection_head`, so that pickle finds them."""
    if name.endswith("Moon"):
        from fedsim.models import MODELS

        for cls in MODELS.values():
            if f"{cls.__name__}Moon" == name:
                return with_projection_head(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: ``moon_cnn``: MOON's CIFAR CNN (d = 84) with the projection head. Parameters for 10 classes:
#: encoder conv1 3*6*25+6 = 456, conv2 6*16*25+16 = 2,416, fc1 400*120+120 = 48,120,
#: fc2 120*84+84 = 10,164; proj1 84*84+84 = 7,140, proj2 84*256+256 = 21,760, fc 256*10+10 = 2,570;
#: total 92,626.
MoonCNN = _head_class(SimpleCNN, "moon_cnn", "MoonCNN")
