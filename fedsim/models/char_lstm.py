"""Character LSTM for Shakespeare next-character prediction, as used by FedMA (Wang et al.,
ICLR 2020, section 4; the authors' ``RNNModel('LSTM', 80, 8, 256, 1)``, itself after the LEAF
Shakespeare model).

Architecture (default widths): Embedding(80, 8), one-layer LSTM 8->256 (batch_first), decoder
Linear 256->80 applied to the LAST time step's output; 293,584 parameters for an 80-symbol
vocabulary. The vocabulary size is ``num_classes``: inputs and targets are both symbol ids.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsim.models._common import (
    uniform_,
)
from fedsim.models.base import FedModel, LayerGroup, MatchLayer


class CharLSTM(FedModel):
    """Embedding -> 1-layer LSTM -> Linear decoder on the last step.

    Input ``(B, L)`` int64 symbol ids in ``[0, num_classes)`` (L = 80 for FedMA's windows, any
    L >= 1 works); output ``(B, num_classes)`` float32 logits of the next symbol.

    Initialisation follows the authors' code: embedding and decoder weight ~ U(-0.1, 0.1), decoder
    bias 0, every LSTM tensor ~ U(-1/sqrt(H), 1/sqrt(H)) (PyTorch's default), all drawn from
    ``generator``.

    Args:
        num_classes: vocabulary size (>= 2), 80 for Shakespeare.
        widths: overrides of ``{"embedding": 8, "lstm": 256}`` (embedding dim E, hidden units H).
        generator: CPU generator every parameter is drawn from; None uses a generator seeded
            with 0. The global RNG is never touched.

    Raises:
        FedsimError: bad ``num_classes``, ``widths`` or ``generator``.
    """

    NAME = "char_lstm"
    input_dtype = torch.int64
    DEFAULT_WIDTHS = {"embedding": 8, "lstm": 256}
    _INIT_RANGE = 0.1

    def __init__(
        self,
        num_classes: int = 80,
        widths: dict[str, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_classes, widths, generator)

    def build(self, generator: torch.Generator) -> None:
        self.embedding = nn.Embedding(self.num_classes, self.widths["embedding"])
        self.lstm = nn.LSTM(self.widths["embedding"], self.widths["lstm"], num_layers=1, batch_first=True)
        self.decoder = nn.Linear(self.widths["lstm"], self.num_classes)

    def init_weights(self, generator: torch.Generator) -> None:
        """The authors' initialisation: embedding and decoder weight ~ U(-0.1, 0.1), every LSTM
        tensor ~ U(-1/sqrt(H), 1/sqrt(H)), decoder bias 0; drawn in that order."""
        uniform_(self.embedding.weight, self._INIT_RANGE, generator)
        for p in self.lstm.parameters():  # weight_ih, weight_hh, bias_ih, bias_hh
            uniform_(p, 1.0 / math.sqrt(self.widths["lstm"]), generator)
        uniform_(self.decoder.weight, self._INIT_RANGE, generator)
        with torch.no_grad():
            self.decoder.bias.zero_()

    @classmethod
    def fits(cls, input_shape: tuple[int, ...]) -> bool:
        """Whether examples of shape ``input_shape`` (a window ``(L,)``) fit this model."""
        shape = tuple(input_shape)
        return len(shape) == 1 and shape[0] >= 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L) int64 -> next-symbol logits (B, num_classes) float32."""
        emb = self.embedding(x)  # (B, L, E)
        out, _ = self.lstm(emb)  # (B, L, H)
        return self.decoder(out[:, -1])  # (B, H) -> (B, V)

    def layer_groups(self) -> list[LayerGroup]:
        """embedding; lstm (weight_ih, weight_hh, bias_ih, bias_hh); decoder."""
        return [
            LayerGroup("embedding", ("embedding.weight",)),
            LayerGroup(
                "lstm",
                ("lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0"),
            ),
            LayerGroup("decoder", ("decoder.weight", "decoder.bias")),
        ]

    def match_layers(self) -> list[MatchLayer]:
        """embedding (columns) -> lstm.weight_ih_l0; lstm hidden units -> decoder (block 1)."""
        return [
            MatchLayer("embedding", "embedding", "embedding.weight", None, "lstm.weight_ih_l0", 1),
            MatchLayer(
                "lstm",
                "lstm",
                "lstm.weight_ih_l0",
                "lstm.bias_ih_l0",
                "decoder.weight",
                1,
                recurrent=("lstm.weight_hh_l0", "lstm.bias_hh_l0"),
            ),
        ]

    def classifier(self) -> tuple[str, str]:
        """``("decoder.weight", "decoder.bias")``."""
        return ("decoder.weight", "decoder.bias")
