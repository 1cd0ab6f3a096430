"""fedsim models: a registry, a builder that checks model/dataset fit, and forward-cost counting.

Every model is a :class:`~fedsim.models.base.FedModel` that lists its layer groups (FedPart) and
matchable layers (FedMA), and can be built at any widths (docs/design.md decision 7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedsim.errors import FedsimError
from fedsim.models._common import probe_forward
from fedsim.models.base import FedModel, LayerGroup, MatchLayer
from fedsim.models.char_lstm import CharLSTM
from fedsim.models.digits_cnn import DigitsCNN
from fedsim.models.lenet import LeNet, LeNetFedMA
from fedsim.models.logreg import LogReg
from fedsim.models.moon import MOON_SUFFIX, MoonCNN, ProjectionHeadModel, with_projection_head
from fedsim.models.resnet import ResNet8, ResNet18
from fedsim.models.vgg import VGG9

__all__ = [
    "MODELS",
    "VGG9",
    "CharLSTM",
    "DigitsCNN",
    "FedModel",
    "LayerGroup",
    "LeNet",
    "LeNetFedMA",
    "LogReg",
    "MatchLayer",
    "MoonCNN",
    "ProjectionHeadModel",
    "ResNet8",
    "ResNet18",
    "build_model",
    "forward_macs",
    "model_class",
    "widths_key",
    "with_projection_head",
]

#: Model name (as in the config's ``model.name``) -> class.
MODELS: dict[str, type[FedModel]] = {
    "lenet": LeNet,
    "lenet_fedma": LeNetFedMA,
    "vgg9": VGG9,
    "char_lstm": CharLSTM,
    "digits_cnn": DigitsCNN,
    "logreg": LogReg,
    "resnet8": ResNet8,
    "resnet18": ResNet18,
    "moon_cnn": MoonCNN,
}


def model_class(name: str) -> type[FedModel]:
    """The class of model ``name``: a key of :data:`MODELS`, or ``"<key>+moon"`` for that model
    with MOON's projection head (:func:`~fedsim.models.moon.with_projection_head`).

    Raises:
        FedsimError: ``name`` is neither.
    """
    base, suffix = name[: -len(MOON_SUFFIX)], name[-len(MOON_SUFFIX) :]
    if name in MODELS:
        return MODELS[name]
    if suffix == MOON_SUFFIX and base in MODELS:
        return with_projection_head(base)
    raise FedsimError(
        f"unknown model {name!r}; set model.name to one of {', '.join(MODELS)} "
        f"(or one of them + {MOON_SUFFIX!r} for MOON's projection head)"
    )


def _input_shape(input_shape: object) -> tuple[int, ...]:
    ok = isinstance(input_shape, Sequence) and not isinstance(input_shape, str)
    shape = tuple(input_shape) if ok else ()
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise FedsimError(
            f"input_shape must be a non-empty sequence of positive ints (got {input_shape!r}); "
            "pass the dataset's input_shape, e.g. (1, 28, 28)"
        )
    return tuple(int(d) for d in shape)


def widths_key(widths: dict[str, int] | None) -> tuple[tuple[str, int], ...]:
    """A hashable key for hidden-layer ``widths`` (None and {} mean the configured ones), for
    caching one model per architecture."""
    return tuple(sorted((widths or {}).items()))


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    widths: dict[str, int] | None = None,
    generator: torch.Generator | None = None,
) -> FedModel:
    """Build the model ``name`` for a dataset whose examples have shape ``input_shape``.

    Args:
        name: a key of :data:`MODELS`, or ``"<key>+moon"`` (see :func:`model_class`).
        num_classes: the dataset's class count (char_lstm: the vocabulary size).
        input_shape: one example's shape, e.g. ``(1, 28, 28)`` or ``(80,)``.
        widths: hidden-layer widths to override (keys: the model's ``DEFAULT_WIDTHS``).
        generator: CPU ``torch.Generator`` every parameter is drawn from, e.g.
            ``fedsim.rng.torch_rng(seed, "init", round, client)``; None uses a generator seeded
            with 0, so the result is deterministic either way. Torch's global RNG is never used
            or changed.

    Returns:
        The model, float32, on the CPU, in training mode.

    Raises:
        FedsimError: unknown ``name``; ``input_shape`` malformed or not what the model takes;
            bad ``num_classes``, ``widths`` or ``generator``.
    """
    cls = model_class(name)
    shape = _input_shape(input_shape)
    if not cls.fits(shape):
        fitting = [n for n, c in MODELS.items() if c.fits(shape)]
        fix = (
            f"use model {' or '.join(repr(n) for n in fitting)} for this dataset"
            if fitting
            else "no built-in model takes this shape; choose a dataset with another input shape"
        )
        raise FedsimError(f"model {name!r} cannot take the dataset's input shape {shape}; {fix}")
    return cls(num_classes=num_classes, widths=widths, generator=generator)


def forward_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass, per example (docs/algorithms.md section 6).

    Counted per layer call, by forward hooks during one forward pass of a single all-zero example
    (float32, or int64 symbol ids when the model's ``input_dtype`` is int64), in eval mode under
    ``torch.no_grad`` (the model's mode and torch's global RNG are left as they were):

    * Conv2d: C_out * H_out * W_out * (C_in / groups) * kh * kw;
    * Linear: (output elements per example / out_features) * in_features * out_features;
    * LSTM: per time step and layer and direction 4 * H * (in + H), summed over steps;
    * Embedding, pooling, activations, dropout, bias additions, normalisation layers: 0.

    Args:
        model: a module built of the layers above (any fedsim model).
        input_shape: one example's shape, e.g. ``(1, 28, 28)`` or ``(80,)``.

    Returns:
        The MAC count as an int (LeNet at default widths: 2,293,000).

    Raises:
        FedsimError: ``input_shape`` is malformed.
        TypeError: the model holds a parametrised layer of a kind not listed above.
    """
    shape = _input_shape(input_shape)
    zero_cost = (nn.Embedding, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    for sub in model.modules():
        has_own = any(True for _ in sub.parameters(recurse=False))
        if has_own and not isinstance(sub, (nn.Conv2d, nn.Linear, nn.LSTM, *zero_cost)):
            raise TypeError(f"forward_macs cannot count a {type(sub).__name__} layer")

    total = 0

    def count(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            out = output  # (1, C_out, H_out, W_out)
            kh, kw = module.kernel_size
            total += out.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features  # output (1, ..., out_features)
        elif isinstance(module, nn.LSTM):
            if module.proj_size:
                raise TypeError("forward_macs cannot count an LSTM with proj_size > 0")
            x = inputs[0]  # (1, T, in) batch_first, else (T, 1, in); unbatched (T, in)
            steps = x.shape[1] if module.batch_first and x.dim() == 3 else x.shape[0]
            h = module.hidden_size
            dirs = 2 if module.bidirectional else 1
            for layer in range(module.num_layers):
                n_in = module.input_size if layer == 0 else h * dirs
                total += dirs * steps * 4 * h * (n_in + h)

    counted = (nn.Conv2d, nn.Linear, nn.LSTM)
    probe_forward(model, shape, counted, count)
    return int(total)
