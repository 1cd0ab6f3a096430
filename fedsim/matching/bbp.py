"""BBP-MAP neuron matching: the MAP solver of PFNM, used by FedMA (docs/algorithms.md section 2).

Sources: Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural Networks"
(PFNM, ICML 2019), section 3 (Beta-Bernoulli process model, Proposition 1 for the posterior of a
global neuron, and the Hungarian sub-problem solved for one client at a time); Wang et al.,
"Federated Learning with Matched Averaging" (FedMA, ICLR 2020), section 2 (BBP-MAP as the layer
matcher). Notation follows docs/algorithms.md section 2.

Implementation notes (what makes it fast; all exact, no approximation):

* The observation precision ``s`` is shared by every client, so the posterior precision of a global
  neuron is ``P_i = p0 + n_i * s``: a function of its count ``n_i``. The state is therefore only
  ``G`` (L, D), updated in place (gather / add / scatter through a preallocated scratch) as
  neurons join and leave, and the counts (L,).
* Every P-dependent factor of the existing-neuron score depends on ``n_i`` only, which takes at
  most J distinct values. With s and p0 constant over coordinates (the defaults) the score is
  ``q(n_i) (|w'_l|^2 + 2 w'_l . G_i) + |G_i|^2 (q(n_i) - 1/P_i)`` with q(n) = 1/(p0 + (n+1) s):
  one GEMM ``w' @ G^T`` per matching plus row reductions. With per-coordinate variances it is one
  GEMM ``w' @ (G * Q)^T`` plus a (L_j, D) x (D, U <= J) product.
* ``|w'_l|^2`` and the new-neuron score of each row do not depend on the global state and are
  computed once per client; the float64 cost matrix for scipy is filled block by block.
* The returned ``global_atoms`` are recomputed from the final assignments, so the add/subtract
  updates of the sweeps leave no rounding drift in the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["POPULARITY_CAP", "MatchResult", "bbp_map", "score_matrix"]

POPULARITY_CAP = 10
"""c = min(n_i, POPULARITY_CAP) in the popularity term log(c / (J - c)) (authors' code)."""


@dataclass(frozen=True)
class MatchResult:
    """The outcome of matching J clients' neurons into L global neurons.

    Attributes:
        assignments: J int64 arrays, in the clients' input order; the j-th has length L_j and maps
            client neuron l to global neuron ``assignments[j][l]`` in ``range(L)``, injectively.
        global_atoms: (L, D) array, dtype of the inputs (float32 or float64): the MAP estimate
            theta_i = G_i / P_i (PFNM Proposition 1), elementwise.
        counts: (L,) int64, number of client neurons matched to each global neuron (each >= 1).
    """

    assignments: list[np.ndarray]
    global_atoms: np.ndarray
    counts: np.ndarray

    @property
    def n_global(self) -> int:
        """L, the number of global neurons."""
        return int(self.counts.shape[0])


# --------------------------------------------------------------------------------------------
# input handling


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} is not convertible to an array: {err}") from err


def _prepare_atoms(atoms: Sequence[Any]) -> list[torch.Tensor]:
    """Validate ``atoms`` and return them as 2-D tensors of one floating dtype on one device."""
    if isinstance(atoms, (np.ndarray, torch.Tensor)) or not isinstance(atoms, Sequence):
        raise ValueError(
            "atoms must be a sequence (list or tuple) of J 2-D arrays, one per client; "
            f"got {type(atoms).__name__}"
        )
    if len(atoms) == 0:
        raise ValueError("atoms is empty: bbp_map needs at least one client (J >= 1)")
    ts = [_as_tensor(a, f"atoms[{j}]") for j, a in enumerate(atoms)]
    for j, t in enumerate(ts):
        if t.ndim != 2:
            raise ValueError(f"atoms[{j}] must be 2-D (L_j, D); got shape {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"atoms[{j}] must be real-valued; got dtype {t.dtype}")
    dims = {int(t.shape[1]) for t in ts}
    if len(dims) != 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in ts)
        raise ValueError(f"all clients' atoms must have the same D (columns); got shapes {shapes}")
    if dims.pop() == 0:
        raise ValueError("atoms have D = 0 coordinates; a neuron needs at least one weight")
    devices = {t.device for t in ts}
    if len(devices) != 1:
        raise ValueError(f"all clients' atoms must be on one device; got {sorted(map(str, devices))}")
    dtype = None
    for t in ts:
        if t.is_floating_point():
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    if dtype is None:
        dtype = torch.float64
    ts = [t.to(dtype) for t in ts]
    for j, t in enumerate(ts):
        # a finite sum proves every entry finite; only an overflowing or non-finite sum needs the
        # elementwise check
        if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"atoms[{j}] contains NaN or infinite values")
    return ts


def _coord_vector(value: Any, name: str, D: int, *, positive: bool, like: torch.Tensor) -> torch.Tensor:
    """A scalar or length-D parameter as a (D,) tensor with ``like``'s dtype and device."""
    arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(D, float(arr))
    elif arr.shape != (D,):
        raise ValueError(f"{name} must be a scalar or a length-D vector (D = {D}); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if positive and not np.all(arr > 0):
        raise ValueError(f"{name} must be > 0 (a variance); got {value!r}")
    return torch.as_tensor(arr, dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------
# scores


@dataclass(frozen=True)
class _Prior:
    """Per-coordinate constants, all (D,) tensors: s = 1/sigma^2, p0 = 1/sigma0^2, m0 = mu0 * p0."""

    s: torch.Tensor
    p0: torch.Tensor
    m0: torch.Tensor
    J: int
    gamma: float
    scalar: tuple[float, float] | None
    """(s, p0) when both are constant over coordinates (enables the rank-1 fast path), else None."""


def _new_row_scores(wp: torch.Tensor, prior: _Prior, wsq: torch.Tensor | None = None) -> torch.Tensor:
    """(L_j,) row part of the new-neuron score: sum_d (w'+m0)^2/(p0+s) - sum_d m0^2/p0.

    PFNM section 3 (cost of opening a new global neuron); docs/algorithms.md section 2. ``wsq`` (L_j,)
    are the row sums of w'^2, used when s and p0 are constant over coordinates.
    """
    const = (prior.m0**2 / prior.p0).sum()
    if prior.scalar is not None:
        s, p0 = prior.scalar
        if wsq is None:
            wsq = (wp * wp).sum(1)
        # sum_d (w' + m0)^2 = |w'|^2 + 2 w'.m0 + |m0|^2
        return (wsq + 2.0 * (wp @ prior.m0) + (prior.m0**2).sum()) / (p0 + s) - const
    return ((wp + prior.m0) ** 2 / (prior.p0 + prior.s)).sum(1) - const


def _popularity(counts: np.ndarray, J: int) -> np.ndarray:
    """(L,) float64 log(c / (J - c)) with c = min(n_i, 10).

    Counts here never include the client being matched, so 1 <= n_i <= J - 1 and the log is finite
    (c == J cannot happen; J == 1 leaves no existing neuron to score). Passing a state that
    violates this is a programming error.
    """
    c = np.minimum(counts, POPULARITY_CAP).astype(np.float64)
    if counts.size and (c.min() < 1 or c.max() >= J):
        raise AssertionError(f"popularity counts must lie in [1, J-1] (J = {J}); got {counts}")
    return np.log(c) - np.log(J - c)


def _existing_scores(
    wp: torch.Tensor, G: torch.Tensor, counts: np.ndarray, prior: _Prior, wsq: torch.Tensor | None = None
) -> torch.Tensor:
    """(L_j, L) scores of joining each existing neuron, in ``wp``'s dtype and on its device.

    score[l, i] = sum_d (w'_ld + G_id)^2 / (s_d + P_id) - sum_d G_id^2 / P_id + log(c_i / (J - c_i))
    (PFNM section 3; docs/algorithms.md section 2), with P_i = p0 + n_i s. ``wp`` (L_j, D) is w' = w * s,
    ``G`` (L >= 1, D) and ``counts`` (L,) the state without this client, ``wsq`` (L_j,) optionally
    the precomputed row sums of w'^2.
    """
    uniq, inv = np.unique(counts, return_inverse=True)
    inv_t = torch.as_tensor(inv.reshape(-1), device=wp.device)
    u = torch.as_tensor(uniq, dtype=wp.dtype, device=wp.device)  # (U,) distinct counts, U <= J
    if prior.scalar is not None:
        s, p0 = prior.scalar
        q = 1.0 / (p0 + (u + 1.0) * s)  # (U,)  1/(s + P_i) per count
        r = q - 1.0 / (p0 + u * s)  # (U,)  1/(s + P_i) - 1/P_i
        if wsq is None:
            wsq = (wp * wp).sum(1)
        # sum_d (w'+G)^2/(s+P) - G^2/P = q (|w'|^2 + 2 w'.G) + |G|^2 (q - 1/P)
        exist = torch.addmm(wsq[:, None], wp, G.T, alpha=2.0)  # (L_j, L): the one GEMM
        exist.mul_(q[inv_t][None, :])
        col = torch.linalg.vector_norm(G, dim=1) ** 2 * r[inv_t]  # (L,)
    else:
        Q = 1.0 / (prior.p0[None, :] + (u[:, None] + 1.0) * prior.s[None, :])  # (U, D)
        R = Q - 1.0 / (prior.p0[None, :] + u[:, None] * prior.s[None, :])  # (U, D)
        A = (wp * wp) @ Q.T  # (L_j, U)
        exist = torch.addmm(A[:, inv_t], wp, (G * Q[inv_t]).T, alpha=2.0)  # (L_j, L)
        col = (G * G * R[inv_t]).sum(1)  # (L,)
    pop = torch.as_tensor(_popularity(counts, prior.J), dtype=wp.dtype, device=wp.device)
    return exist.add_((col + pop)[None, :])


def _new_column_scores(K: int, prior: _Prior) -> np.ndarray:
    """(K,) float64 column part of the new-neuron score: -2 log k + 2 log(gamma / J), k = 1..K."""
    return 2.0 * math.log(prior.gamma / prior.J) - 2.0 * np.log(np.arange(1, K + 1, dtype=np.float64))


def _scores(
    wp: torch.Tensor, new_rows: torch.Tensor, G: torch.Tensor, counts: np.ndarray, prior: _Prior, K: int
) -> torch.Tensor:
    """(L_j, L + K) score matrix of one client (to maximise); see :func:`score_matrix`."""
    blocks = []
    if G.shape[0] > 0:
        blocks.append(_existing_scores(wp, G, counts, prior))
    if K > 0:
        colnew = torch.as_tensor(_new_column_scores(K, prior), dtype=wp.dtype, device=wp.device)
        blocks.append(new_rows[:, None] + colnew[None, :])  # (L_j, K)
    if not blocks:
        return torch.empty((wp.shape[0], 0), dtype=wp.dtype, device=wp.device)
    return torch.cat(blocks, 1)


def score_matrix(
    client_atoms: Any,
    global_sums: Any,
    counts: Any,
    *,
    n_clients: int,
    sigma2: Any = 1.0,
    sigma0_2: Any = 1.0,
    gamma: float = 7.0,
    prior_mean: Any = 0.0,
    n_new: int | None = None,
) -> torch.Tensor:
    """The BBP-MAP score matrix of one client against the current global state (to MAXIMISE).

    PFNM (Yurochkin et al., ICML 2019) section 3, the Hungarian sub-problem for one client with
    the others fixed; formulas exactly as docs/algorithms.md section 2, with s = 1/sigma2,
    p0 = 1/sigma0_2, m0 = prior_mean * p0, w' = w * s and P_i = p0 + n_i * s:

    * existing neuron i (column i < L):
      sum_d (w'_d + G_id)^2 / (s_d + P_id) - sum_d G_id^2 / P_id + log(c / (J - c)), c = min(n_i, 10);
    * k-th new neuron (column L + k - 1, k = 1..K):
      sum_d (w'_d + m0_d)^2 / (p0_d + s_d) - sum_d m0_d^2 / p0_d - 2 log k + 2 log(gamma / J).

    Args:
        client_atoms: (L_j, D) float array or tensor, the client's neurons (unscaled w).
        global_sums: (L, D) G, i.e. m0 + sum of the matched w' of the OTHER clients.
        counts: (L,) integers n_i in [1, n_clients - 1] (the client itself is not counted).
        n_clients: J.
        sigma2, sigma0_2, prior_mean: scalars or length-D vectors; see :func:`bbp_map`.
        gamma: IBP mass, > 0.
        n_new: K, number of new-neuron columns; default L_j.

    Returns:
        (L_j, L + K) tensor in the dtype and on the device of ``client_atoms``.

    Raises:
        ValueError: shapes disagree, or a variance, gamma, n_clients or n_new is out of range.
    """
    w = _prepare_atoms([client_atoms])[0]
    G = _as_tensor(global_sums, "global_sums").to(dtype=w.dtype, device=w.device)
    D = w.shape[1]
    if G.ndim != 2 or (G.shape[0] > 0 and G.shape[1] != D):
        raise ValueError(f"global_sums must be (L, D) with D = {D}; got shape {tuple(G.shape)}")
    G = G.reshape(-1, D)
    cnt = np.asarray(counts, dtype=np.int64).reshape(-1)
    if cnt.shape[0] != G.shape[0]:
        raise ValueError(f"counts has {cnt.shape[0]} entries for {G.shape[0]} global neurons")
    prior = _make_prior(w, D, sigma2, sigma0_2, prior_mean, n_clients, gamma)
    if cnt.size and (cnt.min() < 1 or cnt.max() > n_clients - 1):
        raise ValueError(f"counts must lie in [1, n_clients - 1] = [1, {n_clients - 1}]; got {cnt}")
    K = w.shape[0] if n_new is None else int(n_new)
    if K < 0:
        raise ValueError(f"n_new must be >= 0; got {n_new}")
    wp = w * prior.s
    return _scores(wp, _new_row_scores(wp, prior), G, cnt, prior, K)


def _make_prior(like: torch.Tensor, D: int, sigma2, sigma0_2, prior_mean, J: int, gamma) -> _Prior:
    if not isinstance(J, (int, np.integer)) or J < 1:
        raise ValueError(f"the number of clients J must be an integer >= 1; got {J!r}")
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma (IBP mass) must be finite and > 0; got {gamma}")
    s = 1.0 / _coord_vector(sigma2, "sigma2", D, positive=True, like=like)
    p0 = 1.0 / _coord_vector(sigma0_2, "sigma0_2", D, positive=True, like=like)
    mu0 = _coord_vector(prior_mean, "prior_mean", D, positive=False, like=like)
    scalar = None
    if bool((s == s[0]).all()) and bool((p0 == p0[0]).all()):
        scalar = (float(s[0]), float(p0[0]))
    return _Prior(s=s, p0=p0, m0=mu0 * p0, J=int(J), gamma=gamma, scalar=scalar)


# --------------------------------------------------------------------------------------------
# the solver


def _add_rows_inplace(
    target: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, alpha: float, scratch: torch.Tensor
) -> None:
    """target[idx] += alpha * rows for DISTINCT row ids ``idx`` (n,), ``rows`` (n, D).

    Gathers into the preallocated ``scratch`` (>= n rows), adds, and scatters back: no large
    temporaries, and several times faster on CPU than an accumulating scatter (index_add_).
    """
    tmp = scratch[: idx.shape[0]]
    torch.index_select(target, 0, idx, out=tmp)
    tmp.add_(rows, alpha=alpha)
    target.index_copy_(0, idx, tmp)


class _GlobalState:
    """Mutable BBP-MAP state: G (L, D) and counts (L,) of the global neurons, plus assignments.

    G lives in the first L rows of a buffer whose capacity doubles when full, so opening neurons
    does not copy the whole state each time. Per-client constants (w' = w * s, the new-neuron row
    scores and, on the fast path, |w'|^2 per row) are computed once.
    """

    def __init__(
        self, wp: list[torch.Tensor], prior: _Prior, cap: int | None, budget: int | None = None
    ) -> None:
        self.wp = wp
        self.wsq = [(w * w).sum(1) if prior.scalar is not None else None for w in wp]
        # new-neuron scores, negated for the minimising solver: -(row term) (L_j,) float64
        self.neg_new_rows = [
            -_new_row_scores(w, prior, q).double().cpu().numpy() for w, q in zip(wp, self.wsq)
        ]
        self.prior = prior
        self.cap = cap
        self.budget = budget
        like = wp[0]
        max_rows = max(int(w.shape[0]) for w in wp)
        self.buf = torch.empty((max(1, 2 * max_rows), like.shape[1]), dtype=like.dtype, device=like.device)
        self.scratch = torch.empty((max_rows, like.shape[1]), dtype=like.dtype, device=like.device)
        self.L = 0
        self.counts = np.zeros(0, dtype=np.int64)
        self.assign: list[np.ndarray | None] = [None] * len(wp)

    @property
    def G(self) -> torch.Tensor:
        """(L, D) view of the live rows of the buffer."""
        return self.buf[: self.L]

    def _idx(self, ids: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(ids, dtype=torch.long, device=self.buf.device)

    def _append(self, rows: torch.Tensor) -> np.ndarray:
        """Open one neuron per row of ``rows`` (w' values): G = m0 + w', count 1; returns ids."""
        L, n = self.L, int(rows.shape[0])
        if L + n > self.buf.shape[0]:
            new = torch.empty(
                (max(2 * self.buf.shape[0], L + n), self.buf.shape[1]),
                dtype=self.buf.dtype,
                device=self.buf.device,
            )
            new[:L] = self.buf[:L]
            self.buf = new
        torch.add(rows, self.prior.m0[None, :], out=self.buf[L : L + n])
        self.L = L + n
        self.counts = np.concatenate([self.counts, np.ones(n, dtype=np.int64)])
        return np.arange(L, L + n, dtype=np.int64)

    def initialise(self, j: int) -> None:
        """The client opens one global neuron per row, ids in row order."""
        self.assign[j] = self._append(self.wp[j])

    def match(self, j: int) -> None:
        """Score client j against the state, solve the assignment, and add it to the state."""
        wp = self.wp[j]
        L_j, L = int(wp.shape[0]), self.L
        if L == 0 or L_j == 0:
            # Nothing to join: the new-neuron scores are a row term plus a column term, so every
            # bijection onto the new columns is optimal; take the identity (ids in row order).
            self.initialise(j)
            return
        K = L_j if self.cap is None else min(L_j, self.cap - L)
        if self.budget is not None:
            # authors' rule (IBM/FedMA matching/pfnm.py, compute_cost: max_added = min(L_j, max(700 - L, 1))),
            # raised to L_j - L where fewer columns than rows would leave a neuron unassigned
            K = min(K, max(self.budget - L, 1, L_j - L))
        # cost = -score, float64, built block by block (scipy would copy to float64 anyway)
        cost = np.empty((L_j, L + K), dtype=np.float64)
        exist = _existing_scores(wp, self.G, self.counts, self.prior, self.wsq[j])  # (L_j, L)
        np.negative(exist.cpu().numpy(), out=cost[:, :L])
        np.subtract.outer(self.neg_new_rows[j], _new_column_scores(K, self.prior), out=cost[:, L:])
        if not np.isfinite(cost).all():
            raise ValueError(
                f"BBP-MAP scores overflowed in {wp.dtype} (atoms or 1/sigma2 too large); "
                "pass float64 atoms or rescale them"
            )
        from scipy.optimize import (
            linear_sum_assignment,  # imported here, not at the top: see docs/performance.md
        )

        rows, cols = linear_sum_assignment(cost)
        a = np.empty(L_j, dtype=np.int64)
        a[rows] = cols
        is_new = a >= L
        if not is_new.any():
            self._add_rows(a, wp, 1.0)
        else:
            old = np.flatnonzero(~is_new)
            if old.size:
                self._add_rows(a[old], wp[self._idx(old)], 1.0)
            a[is_new] = self._append(wp[self._idx(np.flatnonzero(is_new))])
        self.assign[j] = a

    def _add_rows(self, ids: np.ndarray, rows: torch.Tensor, alpha: float) -> None:
        """G[ids] += alpha * rows and counts[ids] += sign(alpha), for distinct ``ids``."""
        _add_rows_inplace(self.buf, self._idx(ids), rows, alpha, self.scratch)
        self.counts[ids] += 1 if alpha > 0 else -1

    def remove(self, j: int) -> None:
        """Take client j's contributions out; neurons left with count 0 are deleted, ids compacted."""
        a = self.assign[j]
        self.assign[j] = None
        if a is None or a.size == 0:
            return
        self._add_rows(a, self.wp[j], -1.0)
        dead = self.counts == 0
        if dead.any():
            keep = ~dead
            remap = np.cumsum(keep) - 1
            kept = self.buf[self._idx(np.flatnonzero(keep))]  # (L', D) copy
            self.L = int(kept.shape[0])
            self.buf[: self.L] = kept
            self.counts = self.counts[keep]
            for k, ak in enumerate(self.assign):
                if ak is not None:
                    self.assign[k] = remap[ak]

    def result(self) -> MatchResult:
        """Assignments, counts and theta = G / P recomputed exactly from the assignments."""
        L = self.L
        like = self.wp[0]
        G = self.prior.m0[None, :].expand(L, -1).clone()
        for wp, a in zip(self.wp, self.assign):
            if a is not None and a.size:
                _add_rows_inplace(G, self._idx(a), wp, 1.0, self.scratch)
        n = torch.as_tensor(self.counts, dtype=like.dtype, device=like.device)
        P = self.prior.p0[None, :] + n[:, None] * self.prior.s[None, :]
        theta = (G / P).cpu().numpy()
        return MatchResult(
            assignments=[np.asarray(a, dtype=np.int64).copy() for a in self.assign],
            global_atoms=theta,
            counts=self.counts.copy(),
        )


def bbp_map(
    atoms: Sequence[Any],
    *,
    sigma2: Any = 1.0,
    sigma0_2: Any = 1.0,
    gamma: float = 7.0,
    prior_mean: Any = 0.0,
    iterations: int = 5,
    seed: int | np.random.Generator = 0,
    max_global_neurons: int | None = None,
    growth_budget: int | None = None,
) -> MatchResult:
    """Match J clients' neurons into global neurons by BBP-MAP (PFNM's MAP solver, FedMA's matcher).

    Algorithm (PFNM section 3; FedMA section 2; docs/algorithms.md section 2): clients are sorted by
    decreasing L_j (stable); the first opens one global neuron per row; each other client is
    matched in that order by a rectangular linear assignment on the score matrix of
    :func:`score_matrix` (``scipy.optimize.linear_sum_assignment``, maximised); then
    ``iterations`` sweeps, each over a fresh permutation of all J clients drawn from ``seed``,
    remove the client's contributions (a neuron left with no client is deleted and ids are
    compacted, order preserved) and re-match it. A row matched to an existing neuron i joins it
    (n_i += 1, G_i += w', P_i += s); rows matched to new columns open new neurons, ids in row order.
    The result satisfies max_j L_j <= L <= sum_j L_j (without a cap).

    Edge cases of the popularity term log(c / (J - c)), c = min(n_i, 10): the client being
    matched is never counted in n_i (not yet added in the greedy pass, removed in a sweep), so
    1 <= n_i <= J - 1, c < J and the term is finite. With J == 1 there is never an existing
    neuron to score: the client initialises the model and every sweep deletes and re-creates its
    neurons, so the result is its own neurons prior-shrunk, theta = (m0 + w s) / (p0 + s), with
    the identity assignment. Whenever the state is empty (L == 0) the identity is used, which is
    optimal since new-neuron scores are a row term plus a column term.

    Computation runs in torch, in the inputs' floating dtype (promoted across clients; integer
    inputs become float64) and on their device (CUDA tensors keep the scores on the GPU; only the
    (L_j, L + K) score matrix is copied to the host for scipy).

    Args:
        atoms: J arrays (numpy or torch), client j's of shape (L_j, D); L_j may differ, D may not.
        sigma2: observation variance sigma^2 (s = 1/sigma^2), scalar or length-D, > 0.
        sigma0_2: prior variance sigma0^2 (p0 = 1/sigma0^2), scalar or length-D, > 0.
        gamma: IBP mass gamma > 0 (FedMA CNNs 7; Shakespeare LSTM 1e-3).
        prior_mean: mu0, scalar or length-D (FedMA: 0 for weights, 0.1 for bias coordinates).
        iterations: number of refinement sweeps >= 0; 0 gives the deterministic greedy pass.
        seed: int seed or a numpy Generator (e.g. ``fedsim.rng.numpy_rng(seed, "matching", r)``)
            from which the sweep orders are drawn; unused when iterations == 0.
        max_global_neurons: optional cap on L. When matching a client, only
            K = min(L_j, cap - L) new-neuron columns are offered, so L never exceeds the cap; since
            every row still needs its own column, the cap must be >= max_j L_j. None: no cap
            (K = L_j).
        growth_budget: optional soft budget B on L, the authors' growth rule (IBM/FedMA
            ``matching/pfnm.py``, ``compute_cost``: ``max_added = min(Lj, max(700 - L, 1))``, B = 700
            in all their experiments): a client is offered K = min(L_j, max(B - L, 1)) new-neuron
            columns, so once L reaches B each client can still open one neuron. Where that leaves
            fewer columns than the client has neurons (L + K < L_j), K is raised to L_j - L so that
            every neuron has a column (the authors' code would fail there). None: no budget.

    Returns:
        :class:`MatchResult` with assignments in the clients' input order, global_atoms (L, D)
        as a numpy array of the computation dtype, and counts (L,) int64.

    Raises:
        ValueError: no clients, an atom array is not 2-D, D differs or is 0, devices differ,
            values are not finite, a variance or gamma is not > 0, prior_mean has the wrong
            length, iterations < 0, max_global_neurons < max_j L_j, growth_budget < 1, or the scores overflow the
            dtype (finite but huge inputs).
    """
    ts = _prepare_atoms(atoms)
    J = len(ts)
    D = int(ts[0].shape[1])
    prior = _make_prior(ts[0], D, sigma2, sigma0_2, prior_mean, J, gamma)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be an integer >= 0; got {iterations!r}")
    sizes = np.array([t.shape[0] for t in ts], dtype=np.int64)
    cap = None
    if max_global_neurons is not None:
        cap = int(max_global_neurons)
        if cap != max_global_neurons or cap < int(sizes.max()):
            raise ValueError(
                f"max_global_neurons must be an integer >= max_j L_j = {int(sizes.max())} "
                f"(each neuron of the largest client needs its own global neuron); "
                f"got {max_global_neurons!r}"
            )
    if growth_budget is not None and (
        isinstance(growth_budget, bool) or int(growth_budget) != growth_budget or growth_budget < 1
    ):
        raise ValueError(
            f"growth_budget must be an integer >= 1 (the authors use 700); got {growth_budget!r}"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    unit_s = prior.scalar is not None and prior.scalar[0] == 1.0
    state = _GlobalState(
        [t if unit_s else t * prior.s for t in ts],
        prior,
        cap,
        None if growth_budget is None else int(growth_budget),
    )
    order = np.argsort(-sizes, kind="stable")
    state.initialise(int(order[0]))
    for j in order[1:]:
        state.match(int(j))
    for _ in range(int(iterations)):
        for j in rng.permutation(J):
            state.remove(int(j))
            state.match(int(j))
    return state.result()
