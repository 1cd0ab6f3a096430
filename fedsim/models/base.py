"""Structure metadata every fedsim model carries (docs/design.md decision 7).

Algorithms read a model's structure from here, never from parameter-index arithmetic:
FedPart schedules :class:`LayerGroup` s, FedMA matches :class:`MatchLayer` s in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class LayerGroup:
    """One FedPart layer group, shallow to deep.

    Attributes:
        name: e.g. ``"conv1"`` or ``"layer2.0.conv1"``.
        tensors: state_dict keys in the group: weights, biases and, for a conv with its BatchNorm,
            the BN affine parameters and running statistics.
    """

    name: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class MatchLayer:
    """A layer whose output units FedMA matches (docs/algorithms.md section 3).

    Attributes:
        name: width key of the layer, e.g. ``"conv1"``; ``model.widths[name]`` is its unit count.
        kind: how a unit becomes an atom: ``linear`` (row of weight | bias), ``conv2d`` (flattened
            kernel C_in*k*k | bias), ``embedding`` (column of the (vocab, E) weight), ``lstm``
            (the 4 gate rows of weight_ih for the unit | the 4 bias_ih entries).
        weight: state_dict key of the weight (LSTM: ``weight_ih_l0``).
        bias: state_dict key of the bias (LSTM: ``bias_ih_l0``), or None.
        recurrent: LSTM only: keys of ``weight_hh_l0`` and ``bias_hh_l0``, aggregated as
            (1/J) sum_j Pi_j H_j Pi_j^T per gate, not matched.
        next_weight: state_dict key of the next layer's weight, whose input axis follows this
            layer's units and must be permuted with them.
        next_block: input columns of the next layer per unit of this one: 1 for linear->linear,
            conv->conv (the k*k kernel moves with its input channel) and LSTM->decoder; H*W for a
            conv feeding a flatten (channel-major) then a linear layer.
    """

    name: str
    kind: Literal["linear", "conv2d", "embedding", "lstm"]
    weight: str
    bias: str | None
    next_weight: str
    next_block: int = 1
    recurrent: tuple[str, ...] = ()


class FedModel(nn.Module):
    """Base class of fedsim models: a torch module that describes its own structure.

    Subclasses set ``NAME`` and ``DEFAULT_WIDTHS`` and implement :meth:`build` (the layers),
    :meth:`layer_groups`, :meth:`match_layers` and :meth:`classifier`; :meth:`init_weights`
    defaults to PyTorch's initialisation drawn from the model's generator.
    """

    NAME: str
    DEFAULT_WIDTHS: dict[str, int]
    widths: dict[str, int]

    def __init__(
        self,
        num_classes: int = 10,
        widths: dict[str, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Check ``num_classes`` and ``widths`` (keys of ``DEFAULT_WIDTHS``), build the layers
        with torch's global RNG left untouched, then draw every parameter from ``generator``
        (None: a generator seeded with ``DEFAULT_INIT_SEED``), so weights are deterministic.

        Raises:
            FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
        """
        from fedsim.models._common import (  # _common imports this module
            check_num_classes,
            generator_or_default,
            global_rng_untouched,
            resolve_widths,
        )

        super().__init__()
        self.num_classes = check_num_classes(self.NAME, num_classes)
        self.widths = resolve_widths(self.NAME, self.DEFAULT_WIDTHS, widths)
        g = generator_or_default(generator)
        with global_rng_untouched():
            self.build(g)
        self.init_weights(g)

    def build(self, generator: torch.Generator) -> None:
        """Create the layers from ``self.widths`` and ``self.num_classes``. Their parameters are
        drawn afterwards by :meth:`init_weights`; ``generator`` is for parts that initialise
        themselves (a wrapped encoder model)."""
        raise NotImplementedError

    def init_weights(self, generator: torch.Generator) -> None:
        """Draw every parameter from ``generator``: PyTorch's default distributions, layers in
        registration order (:func:`fedsim.models._common.init_torch_default`)."""
        from fedsim.models._common import init_torch_default

        init_torch_default(self, generator)

    def layer_groups(self) -> list[LayerGroup]:
        """Layer groups, shallow to deep, covering every state_dict key exactly once."""
        raise NotImplementedError

    def match_layers(self) -> list[MatchLayer]:
        """Matchable layers in forward order (all but the classifier)."""
        raise NotImplementedError

    def classifier(self) -> tuple[str, str]:
        """(weight key, bias key) of the last layer, whose output axis is the classes."""
        raise NotImplementedError
