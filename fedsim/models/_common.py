"""Helpers shared by the model files: width validation and generator-driven initialisation.

Every fedsim model is built without touching torch's global RNG (docs/design.md decision 4): layers are
created inside :func:`torch.random.fork_rng` (so PyTorch's own default initialisation draws from a
saved-and-restored global state) and every parameter is then re-initialised from a caller-provided
``torch.Generator``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from fedsim.errors import FedsimError
from fedsim.models.base import LayerGroup

#: Seed of the generator used when a model is built with ``generator=None``.
DEFAULT_INIT_SEED = 0


def resolve_widths(
    model: str, defaults: Mapping[str, int], widths: Mapping[str, int] | None
) -> dict[str, int]:
    """The model's widths: ``defaults`` overridden by ``widths`` (which may name a subset).

    Raises:
        FedsimError: a key of ``widths`` is not a hidden layer of the model, or a value is not a
            positive integer.
    """
    out = dict(defaults)
    for key, value in (widths or {}).items():
        if key not in defaults:
            raise FedsimError(
                f"{model} has no hidden layer {key!r} in widths; use keys among {', '.join(defaults)}"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FedsimError(
                f"{model} width {key!r} must be a positive integer (got {value!r}); "
                f"set it to e.g. {defaults[key]}"
            )
        out[key] = int(value)
    return out


def check_num_classes(model: str, num_classes: int) -> int:
    """``num_classes`` as an int.

    Raises:
        FedsimError: ``num_classes`` is not an integer >= 2.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise FedsimError(
            f"{model} needs num_classes >= 2 (got {num_classes!r}); pass the dataset's class count"
        )
    return int(num_classes)


def generator_or_default(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a fresh CPU generator seeded with :data:`DEFAULT_INIT_SEED`.

    Raises:
        FedsimError: ``generator`` is neither None nor a ``torch.Generator``.
    """
    if generator is None:
        g = torch.Generator()
        g.manual_seed(DEFAULT_INIT_SEED)
        return g
    if not isinstance(generator, torch.Generator):
        raise FedsimError(
            f"generator must be a torch.Generator or None (got {type(generator).__name__}); "
            "build one with fedsim.rng.torch_rng(seed, 'init', round, client)"
        )
    return generator


@contextlib.contextmanager
def global_rng_untouched() -> Iterator[None]:
    """Context in which torch's global CPU RNG may be used; its state is restored on exit."""
    with torch.random.fork_rng(devices=[]):
        yield


@torch.no_grad()
def uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` in place with U(-bound, bound) drawn from ``generator``."""
    tensor.uniform_(-bound, bound, generator=generator)


def init_torch_default(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise the layers of ``module`` with PyTorch default distributions from ``generator``.

    Conv2d / Linear: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what PyTorch's
    ``kaiming_uniform_(a=sqrt(5))`` amounts to); Embedding: N(0, 1); LSTM: every tensor
    ~ U(-1/sqrt(H), 1/sqrt(H)). Layers are visited in registration order, tensors weight first,
    so the same generator state gives bit-identical weights.

    Raises:
        TypeError: a module that owns parameters is of a kind not listed above.
    """
    for sub in module.modules():
        own = list(sub.parameters(recurse=False))
        if not own:
            continue
        if isinstance(sub, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / math.sqrt(sub.weight[0].numel())  # fan_in = C_in/groups * k*k, or in
            uniform_(sub.weight, bound, generator)
            if sub.bias is not None:
                uniform_(sub.bias, bound, generator)
        elif isinstance(sub, nn.Embedding):
            with torch.no_grad():
                sub.weight.normal_(0.0, 1.0, generator=generator)
        elif isinstance(sub, nn.LSTM):
            bound = 1.0 / math.sqrt(sub.hidden_size)
            for p in own:
                uniform_(p, bound, generator)
        else:
            raise TypeError(f"no default initialisation for {type(sub).__name__}")


def probe_forward(model: nn.Module, input_shape, module_types: tuple[type, ...], hook) -> None:
    """Run one all-zero example of ``input_shape`` through ``model`` (float32, or int64 symbol ids
    when the model's ``input_dtype`` is int64) in eval mode under ``torch.no_grad``, calling
    ``hook(module, inputs, output)`` after every forward of a module of ``module_types``.
    The model's mode and torch's global RNG are left as they were (used to count costs)."""
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, module_types)]
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = getattr(model, "input_dtype", torch.float32)
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(torch.zeros((1, *input_shape), dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def weight_bias_groups(names: tuple[str, ...]) -> list[LayerGroup]:
    """One :class:`LayerGroup` per named layer, holding ``<name>.weight`` and ``<name>.bias``."""
    return [LayerGroup(n, (f"{n}.weight", f"{n}.bias")) for n in names]
