"""Views between a network's layers and the atoms (neuron vectors) that BBP-MAP matches.

docs/algorithms.md sections 3 and 4; FedMA (Wang et al., ICLR 2020) sections 2-3; PFNM (Yurochkin et
al., ICML 2019) section 3. Everything is driven by :class:`fedsim.models.base.MatchLayer` metadata
(kind, weight/bias keys, the next layer's weight and its ``next_block``, recurrent keys); no
function here relies on parameter order or index arithmetic over a model.

Conventions. ``state`` is a mapping ``key -> torch.Tensor`` (a state_dict or a slice of one);
every function returns a NEW dict with the same keys in which only the named tensors are replaced
(inputs are never modified in place). A client's ``assignment`` for a layer is a 1-D integer array
``a`` of length L_j, injective into ``range(L)``: its local unit l is global unit ``a[l]``.

Unit axes by kind (L units):

* ``linear``: weight (L, in) rows, bias (L,).
* ``conv2d``: weight (L, C_in, kh, kw) output channels, bias (L,).
* ``embedding``: weight (vocab, L) COLUMNS (an atom is one embedding dimension); no bias.
* ``lstm``: weight_ih (4L, in) and bias_ih (4L,) in PyTorch gate order i, f, g, o, i.e. gate-major
  blocks of L rows; weight_hh (4L, L) has the units on both axes, bias_hh (4L,) on rows.
* next layer input axis: axis 1 of ``next_weight``; each unit owns ``next_block`` consecutive
  entries there (1 for linear->linear, conv->conv, embedding->LSTM and LSTM->decoder; H*W for a
  conv flattened channel-major into a linear layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedsim.models.base import MatchLayer

__all__ = [
    "atom_prior_mean",
    "atoms_to_layer",
    "layer_atoms",
    "n_units",
    "outgoing_atoms",
    "permute_next_input",
    "permute_recurrent",
    "permute_units",
    "slice_to_client",
]

_KINDS = ("linear", "conv2d", "embedding", "lstm")
_GATES = 4  # PyTorch LSTM gates i, f, g, o


# --------------------------------------------------------------------------------------------
# helpers


def _get(state: Mapping[str, torch.Tensor], key: str | None, what: str) -> torch.Tensor:
    if key is None or key not in state:
        raise ValueError(f"state has no tensor {key!r} ({what}); keys: {sorted(state)[:12]}")
    t = state[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"state[{key!r}] must be a torch.Tensor; got {type(t).__name__}")
    return t


def _check_kind(layer: MatchLayer) -> None:
    if layer.kind not in _KINDS:
        raise ValueError(f"layer {layer.name!r}: unknown kind {layer.kind!r}; expected one of {_KINDS}")
    if layer.kind == "embedding" and layer.bias is not None:
        raise ValueError(f"layer {layer.name!r}: an embedding has no bias (got bias={layer.bias!r})")
    if layer.next_block < 1:
        raise ValueError(f"layer {layer.name!r}: next_block must be >= 1; got {layer.next_block}")


def n_units(state: Mapping[str, torch.Tensor], layer: MatchLayer) -> int:
    """Number of units (L) of ``layer`` in ``state``, read from its weight's shape.

    Raises:
        ValueError: the weight is missing or its shape does not fit ``layer.kind``.
    """
    _check_kind(layer)
    w = _get(state, layer.weight, f"weight of {layer.name}")
    want = {"linear": 2, "conv2d": 4, "embedding": 2, "lstm": 2}[layer.kind]
    if w.ndim != want:
        raise ValueError(
            f"layer {layer.name!r} ({layer.kind}): weight {layer.weight!r} must be {want}-D; "
            f"got shape {tuple(w.shape)}"
        )
    if layer.kind == "embedding":
        return int(w.shape[1])
    if layer.kind == "lstm":
        if w.shape[0] % _GATES:
            raise ValueError(
                f"layer {layer.name!r}: LSTM weight_ih rows ({w.shape[0]}) must be 4 * hidden size"
            )
        return int(w.shape[0]) // _GATES
    return int(w.shape[0])


def _bias(state: Mapping[str, torch.Tensor], layer: MatchLayer, L: int) -> torch.Tensor | None:
    if layer.bias is None:
        return None
    b = _get(state, layer.bias, f"bias of {layer.name}")
    want = _GATES * L if layer.kind == "lstm" else L
    if tuple(b.shape) != (want,):
        raise ValueError(
            f"layer {layer.name!r}: bias {layer.bias!r} must have shape ({want},); got {tuple(b.shape)}"
        )
    return b


def _as_index(assignment: Any, n: int, width: int, what: str, device: torch.device) -> torch.Tensor:
    """Validate an assignment (length n, distinct ids in [0, width)) and return it as a long tensor."""
    a = np.asarray(assignment.detach().cpu() if isinstance(assignment, torch.Tensor) else assignment)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{what}: assignment must be 1-D of length {n}; got shape {a.shape}")
    if n and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}: assignment must hold integers; got dtype {a.dtype}")
    a = a.astype(np.int64)
    if n and (a.min() < 0 or a.max() >= width):
        raise ValueError(f"{what}: assignment ids must lie in [0, {width}); got min {a.min()} max {a.max()}")
    if np.unique(a).shape[0] != n:
        raise ValueError(f"{what}: assignment must be injective (distinct global ids)")
    return torch.as_tensor(a, dtype=torch.long, device=device)


def _take(t: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
    """new[..., l, ...] = t[..., idx[l], ...] along ``axis``."""
    return t.index_select(axis, idx)


def _place(t: torch.Tensor, axis: int, idx: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros of size ``width`` along ``axis`` with new[..., idx[l], ...] = t[..., l, ...]."""
    shape = list(t.shape)
    shape[axis] = width
    out = t.new_zeros(shape)
    return out.index_copy_(axis, idx, t)


def _gated(t: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn(view, axis=1)`` to the unit axis of a gate-major (4H, ...) tensor."""
    v = t.reshape(_GATES, t.shape[0] // _GATES, *t.shape[1:])  # (4, H, ...)
    out = fn(v, 1)
    return out.reshape(_GATES * out.shape[1], *out.shape[2:])


def _blocked(t: torch.Tensor, block: int, fn) -> torch.Tensor:
    """Apply ``fn(view, axis=1)`` to axis 1 of ``t`` seen as (out, units, block, ...)."""
    if t.ndim < 2 or t.shape[1] % block:
        raise ValueError(
            f"next layer weight of shape {tuple(t.shape)}: input axis is not a multiple of next_block {block}"
        )
    v = t.reshape(t.shape[0], t.shape[1] // block, block, *t.shape[2:])  # (out, L, block, ...)
    out = fn(v, 1)
    return out.reshape(out.shape[0], out.shape[1] * block, *out.shape[3:])


def _own_out_axis(state, layer: MatchLayer, key: str, fn) -> torch.Tensor:
    """Apply ``fn(view, axis)`` to the output (unit) axis of the layer's weight or bias ``key``."""
    t = state[key]
    if layer.kind == "lstm":
        return _gated(t, fn)
    if layer.kind == "embedding":
        return fn(t, 1)
    return fn(t, 0)


# --------------------------------------------------------------------------------------------
# atoms


def layer_atoms(state: Mapping[str, torch.Tensor], layer: MatchLayer) -> torch.Tensor:
    """The atoms of ``layer``: one row per unit (docs/algorithms.md section 3; PFNM section 3).

    * linear: [weight row (in) | bias] -> D = in + 1;
    * conv2d: [kernel flattened C_in*kh*kw | bias] -> D = C_in*kh*kw + 1;
    * embedding (vocab, E): column e (vocab values) -> (E, vocab), no bias;
    * lstm (gate order i, f, g, o): unit h -> [weight_ih rows h, H+h, 2H+h, 3H+h | bias_ih entries
      h, H+h, 2H+h, 3H+h] -> D = 4*in + 4.
    Layers declared without bias omit the bias coordinates.

    Returns:
        (L, D) tensor, dtype and device of the weight (a copy; the state is not modified).

    Raises:
        ValueError: a key is missing or a shape does not fit the layer's kind.
    """
    L = n_units(state, layer)
    w = state[layer.weight]
    b = _bias(state, layer, L)
    if layer.kind == "embedding":
        return w.T.contiguous()  # (E, vocab)
    if layer.kind == "lstm":
        n_in = w.shape[1]
        rows = w.reshape(_GATES, L, n_in).permute(1, 0, 2).reshape(L, _GATES * n_in)  # (H, 4*in)
        if b is None:
            return rows.contiguous()
        return torch.cat([rows, b.reshape(_GATES, L).T.to(w.dtype)], 1)  # (H, 4*in + 4)
    rows = w.reshape(L, -1)  # (L, in) or (L, C_in*kh*kw)
    if b is None:
        return rows.clone()
    return torch.cat([rows, b.reshape(L, 1).to(w.dtype)], 1)


def outgoing_atoms(state: Mapping[str, torch.Tensor], layer: MatchLayer) -> torch.Tensor:
    """Each unit's OUTGOING weights: its slot of the next layer's input axis, one row per unit.

    PFNM (Yurochkin et al., ICML 2019, section 3) matches the last hidden layer's neurons together
    with their weights into the output layer, so that neurons voting for different classes are not
    merged; its authors' code appends them to that layer's atoms (IBM/probabilistic-federated-
    neural-matching, ``matching/pfnm.py``, ``layer_group_descent``, the branch
    ``c == n_layers - 1``).

    Args:
        state: tensors holding ``layer.next_weight`` of shape (out, L * next_block, ...).
        layer: the layer whose units are the rows.

    Returns:
        (L, out * next_block * rest) tensor, dtype and device of the next weight (a copy): row l
        holds every entry of the next weight that unit l feeds.

    Raises:
        ValueError: the next weight is missing or its input axis is not a multiple of next_block.
    """
    nw = _checked_next_weight(state, layer)
    L = nw.shape[1] // layer.next_block
    v = nw.reshape(nw.shape[0], L, -1)  # (out, L, next_block * rest)
    return v.permute(1, 0, 2).reshape(L, -1).clone()


def atoms_to_layer(
    global_atoms: Any, layer: MatchLayer, like_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_atoms`: tensors of ``layer`` with L = len(global_atoms) units.

    The input width is inferred from D (so ``like_state`` may be narrower or wider on the input
    axis than the atoms); ``like_state`` supplies the dtype, device, and a conv's kernel size.

    Args:
        global_atoms: (L, D) numpy array or tensor.
        layer: the layer's metadata.
        like_state: any state holding ``layer.weight`` (e.g. a client's).

    Returns:
        ``{layer.weight: ..., layer.bias: ...}`` (no bias key when the layer has none): linear
        (L, in) and (L,); conv2d (L, C_in, kh, kw) and (L,); embedding (vocab, L); lstm (4L, in) and
        (4L,), gate-major.

    Raises:
        ValueError: atoms are not 2-D, or D does not fit the layer (e.g. not 4*in + 4 for an LSTM).
    """
    _check_kind(layer)
    like = _get(like_state, layer.weight, f"weight of {layer.name}")
    A = torch.as_tensor(global_atoms).to(dtype=like.dtype, device=like.device)
    if A.ndim != 2:
        raise ValueError(f"global_atoms must be 2-D (L, D); got shape {tuple(A.shape)}")
    L, D = A.shape
    if layer.kind == "embedding":
        return {layer.weight: A.T.contiguous()}
    n_bias = 0 if layer.bias is None else (_GATES if layer.kind == "lstm" else 1)
    n_w = D - n_bias
    out: dict[str, torch.Tensor] = {}
    if layer.kind == "lstm":
        if n_w <= 0 or n_w % _GATES:
            raise ValueError(f"layer {layer.name!r}: LSTM atoms need D = 4*in + {n_bias}; got D = {D}")
        n_in = n_w // _GATES
        out[layer.weight] = A[:, :n_w].reshape(L, _GATES, n_in).permute(1, 0, 2).reshape(_GATES * L, n_in)
        if n_bias:
            out[layer.bias] = A[:, n_w:].T.reshape(_GATES * L).contiguous()
        return out
    if layer.kind == "conv2d":
        if like.ndim != 4:
            raise ValueError(f"layer {layer.name!r}: like_state weight must be 4-D for conv2d")
        kh, kw = like.shape[2], like.shape[3]
        if n_w <= 0 or n_w % (kh * kw):
            raise ValueError(
                f"layer {layer.name!r}: conv atoms need D = C_in*{kh}*{kw} + {n_bias}; got D = {D}"
            )
        out[layer.weight] = A[:, :n_w].reshape(L, n_w // (kh * kw), kh, kw).contiguous()
    else:
        if n_w <= 0:
            raise ValueError(f"layer {layer.name!r}: linear atoms need D >= {n_bias + 1}; got D = {D}")
        out[layer.weight] = A[:, :n_w].contiguous()
    if n_bias:
        out[layer.bias] = A[:, n_w].contiguous()
    return out


def atom_prior_mean(layer: MatchLayer, n_coords: int, weight: float = 0.0, bias: float = 0.1) -> np.ndarray:
    """Per-coordinate prior mean mu0 of ``layer``'s atoms (FedMA: 0 for weights, 0.1 for biases).

    Args:
        layer: the layer's metadata (decides how many trailing coordinates are biases: 1 for
            linear/conv2d with bias, 4 for lstm with bias, none for embedding).
        n_coords: D, the atoms' length.

    Returns:
        (D,) float64 array for ``bbp_map(prior_mean=...)``.

    Raises:
        ValueError: ``n_coords`` is smaller than the number of bias coordinates plus one.
    """
    _check_kind(layer)
    n_bias = 0 if layer.bias is None else (_GATES if layer.kind == "lstm" else 1)
    if n_coords <= n_bias:
        raise ValueError(f"layer {layer.name!r}: D = {n_coords} leaves no weight coordinates")
    mu = np.full(n_coords, float(weight))
    if n_bias:
        mu[-n_bias:] = float(bias)
    return mu


# --------------------------------------------------------------------------------------------
# permutations between client and global positions


def _next_weight(state, layer: MatchLayer) -> torch.Tensor:
    return _get(state, layer.next_weight, f"next layer weight of {layer.name}")


def _checked_next_weight(state, layer: MatchLayer) -> torch.Tensor:
    """The next layer's weight, checked to have an input axis of whole ``next_block`` blocks.

    Raises:
        ValueError: an unknown layer kind, a missing key, or a ragged input axis.
    """
    _check_kind(layer)
    nw = _next_weight(state, layer)
    if nw.ndim < 2 or nw.shape[1] % layer.next_block:
        raise ValueError(
            f"layer {layer.name!r}: next weight {layer.next_weight!r} of shape {tuple(nw.shape)} has an "
            f"input axis that is not a multiple of next_block {layer.next_block}"
        )
    return nw


def permute_next_input(
    state: Mapping[str, torch.Tensor], layer: MatchLayer, assignment: Any, global_width: int
) -> dict[str, torch.Tensor]:
    """Move the NEXT layer's input axis of a client to the global positions of its assignment.

    After ``layer`` is matched (FedMA section 2, docs/algorithms.md sections 3-4), the client's input
    slot l of ``layer.next_weight`` (a block of ``next_block`` columns: a k*k kernel slice for
    conv->conv, H*W channel-major columns for conv->linear, one column for linear->linear,
    embedding->LSTM and LSTM->decoder) moves to global position ``assignment[l]``; the other
    ``global_width - L_j`` positions are zero, so the client's function is unchanged when its own
    layer is replaced by one whose unit ``assignment[l]`` equals its unit l.

    Args:
        state: the client's tensors (``layer.next_weight`` with input axis of L_j * next_block).
        layer: the matched layer's metadata.
        assignment: (L_j,) distinct ints in [0, global_width).
        global_width: L, the matched layer's global unit count.

    Returns:
        New dict; ``next_weight`` becomes (out, L * next_block, ...).

    Raises:
        ValueError: missing key, input axis not a multiple of next_block, or a bad assignment.
    """
    nw = _checked_next_weight(state, layer)
    L_j = nw.shape[1] // layer.next_block
    idx = _as_index(assignment, L_j, int(global_width), f"layer {layer.name!r}", nw.device)
    out = dict(state)
    width = int(global_width)
    out[layer.next_weight] = _blocked(nw, layer.next_block, lambda v, ax: _place(v, ax, idx, width))
    return out


def permute_recurrent(
    state: Mapping[str, torch.Tensor], layer: MatchLayer, assignment: Any, global_width: int
) -> dict[str, torch.Tensor]:
    """Place an LSTM's hidden-to-hidden tensors at global positions: Pi H Pi^T per gate.

    docs/algorithms.md section 3 (FedMA section 2, its extension to LSTMs): recurrent weights are not
    matched but aggregated as H_glob = (1/J) sum_j Pi_j H_j Pi_j^T per gate. ``weight_hh``
    (4L_j, L_j) becomes (4L, L) with rows (within each gate block) and columns moved by ``assignment``; ``bias_hh``
    (4L_j,) becomes (4L,) with rows moved; positions no unit of the client maps to are zero.
    Summing the results over clients and dividing by J gives the aggregate.

    Args:
        state: the client's tensors, including ``layer.recurrent`` keys.
        layer: an ``lstm`` layer's metadata.
        assignment: (L_j,) distinct ints in [0, global_width).
        global_width: L.

    Returns:
        New dict; only the ``layer.recurrent`` tensors are replaced.

    Raises:
        ValueError: the layer is not an LSTM with recurrent keys, shapes do not fit, or a bad
            assignment.
    """
    _check_kind(layer)
    if layer.kind != "lstm" or not layer.recurrent:
        raise ValueError(f"layer {layer.name!r}: permute_recurrent needs an lstm layer with recurrent keys")
    L = int(global_width)
    out = dict(state)
    for key in layer.recurrent:
        t = _get(state, key, f"recurrent tensor of {layer.name}")
        L_j = t.shape[0] // _GATES
        if t.shape[0] % _GATES or (t.ndim == 2 and t.shape[1] != L_j) or t.ndim not in (1, 2):
            raise ValueError(
                f"layer {layer.name!r}: {key!r} of shape {tuple(t.shape)} is not (4H, H) or (4H,)"
            )
        idx = _as_index(assignment, L_j, L, f"layer {layer.name!r}", t.device)
        t = _gated(t, lambda v, ax, idx=idx: _place(v, ax, idx, L))
        if t.ndim == 2:
            t = _place(t, 1, idx, L)
        out[key] = t
    return out


def slice_to_client(
    global_state: Mapping[str, torch.Tensor],
    layers: Sequence[MatchLayer],
    assignments_per_layer: Sequence[Any] | Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """The global model cut back to a client's ORIGINAL widths (FedMA with communication).

    docs/algorithms.md section 4: the client keeps global unit ``a[l]`` at local position l, on the
    output axis of every matched layer (and both axes of LSTM recurrent tensors) and on the input
    axis of the next layer. Tensors not tied to a matched layer's units are passed through.

    Args:
        global_state: the global model's tensors (layer n with L_n units).
        layers: matched layers in forward order (``model.match_layers()``).
        assignments_per_layer: one (L_j,) assignment per layer, as a sequence aligned with
            ``layers`` or a mapping from layer name.

    Returns:
        New dict with the client's shapes (layer n with L_j,n units).

    Raises:
        ValueError: a layer has no assignment, a key is missing, or an assignment is not
            injective into the global layer.
    """
    if isinstance(assignments_per_layer, Mapping):
        missing = [l.name for l in layers if l.name not in assignments_per_layer]
        if missing:
            raise ValueError(f"no assignment for layers {missing}")
        assigns = [assignments_per_layer[l.name] for l in layers]
    else:
        assigns = list(assignments_per_layer)
        if len(assigns) != len(layers):
            raise ValueError(f"{len(assigns)} assignments for {len(layers)} layers")
    out = dict(global_state)
    for layer, a in zip(layers, assigns):
        L = n_units(out, layer)
        n = len(a) if not isinstance(a, torch.Tensor) else int(a.shape[0])
        idx = _as_index(a, n, L, f"layer {layer.name!r}", out[layer.weight].device)
        take = lambda v, ax, idx=idx: _take(v, ax, idx)  # noqa: E731
        _bias(out, layer, L)  # validates the bias shape
        for key in (layer.weight, layer.bias):
            if key is not None:
                out[key] = _own_out_axis(out, layer, key, take)
        if layer.kind == "lstm":
            for key in layer.recurrent:
                t = _gated(_get(out, key, f"recurrent tensor of {layer.name}"), take)
                out[key] = _take(t, 1, idx) if t.ndim == 2 else t
        nw = _next_weight(out, layer)
        if nw.ndim < 2 or nw.shape[1] != L * layer.next_block:
            raise ValueError(
                f"layer {layer.name!r}: next weight {layer.next_weight!r} of shape {tuple(nw.shape)} does "
                f"not have {L} * next_block {layer.next_block} input entries"
            )
        out[layer.next_weight] = _blocked(nw, layer.next_block, take)
    return out


def permute_units(
    state: Mapping[str, torch.Tensor], layers: Sequence[MatchLayer], perms: Sequence[Any] | Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Reorder the hidden units of a network: new unit l of layer n is old unit ``perms[n][l]``.

    Rows (output axis, every gate block for an LSTM, both axes of recurrent tensors) and the next
    layer's input axis move together, so the network computes the same function.

    Args:
        state: the network's tensors.
        layers: matched layers in forward order.
        perms: one permutation of range(L_n) per layer (sequence aligned with ``layers`` or a
            mapping from layer name).

    Returns:
        New dict of the same shapes.

    Raises:
        ValueError: a perm is not a permutation of the layer's units (or as :func:`slice_to_client`).
    """
    seq = [perms[l.name] for l in layers] if isinstance(perms, Mapping) else list(perms)
    if len(seq) != len(layers):
        raise ValueError(f"{len(seq)} permutations for {len(layers)} layers")
    for layer, p in zip(layers, seq):
        L = n_units(state, layer)
        if len(p) != L:
            raise ValueError(f"layer {layer.name!r}: permutation of length {len(p)} for {L} units")
    return slice_to_client(state, layers, seq)
