"""Ways to split a training set across J clients: i.i.d. shards and Dirichlet label skew.

Every function takes an explicit ``numpy.random.Generator`` (build it with
``fedsim.rng.numpy_rng(seed, "partition")``) and returns ``J`` sorted, disjoint ``(n_j,)`` int64
index arrays into the training set; :func:`hetero_dir`, which must draw exactly as the FedMA
authors' code, builds its own legacy ``RandomState`` from the seed instead. Nothing here touches
a global random state.
"""

from __future__ import annotations

import numpy as np

from fedsim.errors import FedsimError

#: How many whole-partition redraws :func:`dirichlet` tries before it gives up.
MAX_REDRAWS = 1000


def _check_clients(n_examples: int, num_clients: int) -> None:
    if int(num_clients) < 1:
        raise FedsimError(f"data.num_clients must be >= 1 (got {num_clients}); use at least one client")
    if int(num_clients) > int(n_examples):
        raise FedsimError(
            f"data.num_clients={num_clients} is more than the {n_examples} training examples; "
            f"use at most {n_examples} clients"
        )


def _check_examples_per_client(n_examples: int, num_clients: int, examples_per_client: int) -> None:
    if int(examples_per_client) < 1:
        raise FedsimError(
            f"data.examples_per_client must be >= 1 (got {examples_per_client}); "
            "use a positive count or leave it unset"
        )
    if int(num_clients) * int(examples_per_client) > int(n_examples):
        raise FedsimError(
            f"data.num_clients * data.examples_per_client = {num_clients} * {examples_per_client} "
            f"exceeds the {n_examples} training examples; lower one of them "
            f"(at most {int(n_examples) // int(num_clients)} examples per client)"
        )


def iid(
    n_examples: int,
    num_clients: int,
    rng: np.random.Generator,
    examples_per_client: int | None = None,
) -> list[np.ndarray]:
    """Uniformly random, disjoint shards.

    The indices ``0..n_examples-1`` are permuted once with ``rng``. Without
    ``examples_per_client`` the permutation is cut into ``num_clients`` contiguous pieces whose
    sizes differ by at most one (the first ``n_examples % num_clients`` clients get one extra), so
    every example belongs to exactly one client. With ``examples_per_client = e`` client j gets
    permutation entries ``[j*e, (j+1)*e)``: exactly e examples each, the rest of the training set
    unused (FedPart's "40 clients with 500 i.i.d. images each", docs/algorithms.md section 7).

    Args:
        n_examples: N, size of the training set.
        num_clients: J >= 1.
        rng: the ``"partition"`` stream generator.
        examples_per_client: optional e >= 1 with J * e <= N.

    Returns:
        J sorted ``(n_j,)`` int64 index arrays, pairwise disjoint.

    Raises:
        FedsimError: J < 1, J > N, e < 1 or J * e > N.
    """
    _check_clients(n_examples, num_clients)
    perm = rng.permutation(int(n_examples)).astype(np.int64)
    if examples_per_client is not None:
        _check_examples_per_client(n_examples, num_clients, examples_per_client)
        e = int(examples_per_client)
        shards = [perm[j * e : (j + 1) * e] for j in range(int(num_clients))]
    else:
        shards = np.array_split(perm, int(num_clients))
    return [np.sort(s) for s in shards]


def _hetero_dir_draw(
    labels: np.ndarray,
    classes: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator | np.random.RandomState,
) -> list[np.ndarray] | None:
    """One draw of the FedMA hetero-dir recipe; None if a class put all its mass on full clients."""
    n = labels.shape[0]
    cap = n / num_clients
    held = np.zeros(num_clients, dtype=np.int64)
    pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in classes:
        idx_k = np.flatnonzero(labels == k)
        rng.shuffle(idx_k)
        p = rng.dirichlet(np.full(num_clients, alpha))
        p = np.where(held < cap, p, 0.0)  # clients already at N/J receive nothing more
        total = p.sum()
        if not total > 0.0:
            return None
        p = p / total
        # Cut points floor(cumsum(p) * n_k); the last piece runs to the end of the class so
        # floating-point rounding of the final cumsum can never drop an example.
        cuts = np.floor(np.cumsum(p)[:-1] * idx_k.shape[0]).astype(np.int64)
        for j, piece in enumerate(np.split(idx_k, cuts)):
            pieces[j].append(piece)
            held[j] += piece.shape[0]
    return [np.sort(np.concatenate(ps)).astype(np.int64) for ps in pieces]


def _per_client_dirichlet(
    labels: np.ndarray,
    classes: np.ndarray,
    num_clients: int,
    alpha: float,
    examples_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Exactly e examples per client; each client's class mixture q_j ~ Dir(alpha * 1_K)."""
    pools = []
    for k in classes:
        idx_k = np.flatnonzero(labels == k)
        rng.shuffle(idx_k)
        pools.append(idx_k)
    left = np.array([p.shape[0] for p in pools], dtype=np.int64)
    taken = np.zeros_like(left)
    out = []
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(len(classes), alpha))
        want = np.zeros_like(left)
        need = examples_per_client
        while need > 0:
            room = left - want
            w = np.where(room > 0, q, 0.0)
            if not w.sum() > 0.0:  # all of the client's mass sits on exhausted classes
                w = (room > 0).astype(np.float64)
            draw = rng.multinomial(need, w / w.sum())
            draw = np.minimum(draw, room)
            want += draw
            need -= int(draw.sum())
        mine = [pools[c][taken[c] : taken[c] + want[c]] for c in range(len(classes))]
        taken += want
        left -= want
        out.append(np.sort(np.concatenate(mine)).astype(np.int64))
    return out


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    examples_per_client: int | None = None,
) -> list[np.ndarray]:
    """Label-skewed partition by Dirichlet proportions.

    Without ``examples_per_client`` this is the exact "hetero-dir" recipe of the FedMA authors'
    code (IBM/FedMA, also used by MOON; docs/algorithms.md section 7). With N examples and J clients,
    for each class k in increasing label order: shuffle the class's indices, draw
    p ~ Dir(alpha * 1_J), set p_j = 0 for every client already holding >= N/J examples,
    renormalise, and cut the shuffled class at floor(cumsum(p) * n_k). The whole partition is
    redrawn until every client holds >= ``min_size`` examples, at most :data:`MAX_REDRAWS` times.

    With ``examples_per_client = e`` every client gets exactly e examples (J * e <= N), which the
    hetero-dir recipe cannot guarantee, so a per-client recipe is used instead (Hsu, Qi and Brown,
    "Measuring the Effects of Non-Identical Data Distribution", 2019): clients in order 0..J-1
    each draw a class mixture q_j ~ Dir(alpha * 1_K) and take Multinomial(e, q_j) examples per
    class from what earlier clients left; counts that exceed a class's remainder are redrawn over
    the classes that still have examples (uniformly if q_j puts no mass there). ``min_size`` is not
    used in this mode (every client has e).

    Args:
        labels: ``(N,)`` integer class labels.
        num_clients: J >= 1.
        alpha: Dirichlet concentration > 0; smaller means more skew (FedMA/MOON 0.5, FedPart 0.1).
        rng: the ``"partition"`` stream generator.
        min_size: smallest client the hetero-dir recipe accepts (FedMA: 10).
        examples_per_client: optional e >= 1, see above.

    Returns:
        J sorted ``(n_j,)`` int64 index arrays, pairwise disjoint; without e their union is
        ``0..N-1``.

    Raises:
        FedsimError: alpha <= 0, J < 1, J > N, J * min_size > N, e < 1, J * e > N, or no draw
            within :data:`MAX_REDRAWS` gave every client ``min_size`` examples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise FedsimError(f"labels must be a 1-D array (got shape {labels.shape}); pass (N,) labels")
    n = int(labels.shape[0])
    if not (np.isfinite(alpha) and float(alpha) > 0.0):
        raise FedsimError(f"data.alpha must be > 0 (got {alpha}); use a positive Dirichlet alpha such as 0.5")
    _check_clients(n, num_clients)
    num_clients = int(num_clients)
    alpha = float(alpha)
    classes = np.unique(labels)
    if examples_per_client is not None:
        _check_examples_per_client(n, num_clients, examples_per_client)
        return _per_client_dirichlet(labels, classes, num_clients, alpha, int(examples_per_client), rng)
    if num_clients * int(min_size) > n:
        raise FedsimError(
            f"{num_clients} clients cannot each hold >= {min_size} of {n} examples; "
            f"use at most {n // max(int(min_size), 1)} clients"
        )
    for _ in range(MAX_REDRAWS):
        parts = _hetero_dir_draw(labels, classes, num_clients, alpha, rng)
        if parts is not None and min(p.shape[0] for p in parts) >= int(min_size):
            return parts
    raise FedsimError(
        f"no Dirichlet draw in {MAX_REDRAWS} tries gave all {num_clients} clients >= {min_size} "
        f"examples (alpha={alpha}); use fewer clients or a larger data.alpha"
    )


def hetero_dir(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, num_classes: int, min_size: int = 10
) -> list[np.ndarray]:
    """The FedMA authors' "hetero-dir" partition, draw for draw: the same clients as their code.

    The recipe of :func:`dirichlet` (per class k = 0..K-1: shuffle, p ~ Dir(alpha * 1_J), p_j = 0
    for clients holding >= N/J, cut at floor(cumsum(p) * n_k); whole redraws until every client
    holds >= ``min_size``), with the authors' random source instead of the ``partition`` stream:
    numpy's legacy ``RandomState(seed)``, which draws exactly as their global ``np.random`` after
    ``np.random.seed(seed)`` (IBM/FedMA ``main.py`` lines 1523-1532; the recipe is
    ``utils.py``, ``partition_data``, lines 95-117). Every class 0..K-1 takes its shuffle and its
    Dirichlet draw even when it has no example, as their fixed ``K`` loop does. Their final
    shuffle of each client's indices changes no set, so it is left out; the indices are sorted.
    Given the same labels in the same order (for MNIST, torchvision's training-set order, as
    theirs) and the same seed, client j holds exactly their client j's examples.

    Args:
        labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        num_clients: J >= 1.
        alpha: Dirichlet concentration > 0 (the authors: 0.5).
        seed: the experiment's ``seed`` (the authors' code seeds with 0).
        num_classes: K, the dataset's number of classes (the authors' code: 10).
        min_size: smallest client accepted (the authors: 10).

    Returns:
        J sorted ``(n_j,)`` int64 index arrays, pairwise disjoint, whose union is ``0..N-1``.

    Raises:
        FedsimError: alpha <= 0, J < 1, J > N, J * min_size > N, or no draw within
            :data:`MAX_REDRAWS` gave every client ``min_size`` examples (the authors' loop would
            not end).
    """
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if not (np.isfinite(alpha) and float(alpha) > 0.0):
        raise FedsimError(f"data.alpha must be > 0 (got {alpha}); use a positive Dirichlet alpha such as 0.5")
    _check_clients(n, num_clients)
    if int(num_clients) * int(min_size) > n:
        raise FedsimError(f"{num_clients} clients cannot each hold >= {min_size} of {n} examples; use fewer")
    rng = np.random.RandomState(int(seed))
    for _ in range(MAX_REDRAWS):
        parts = _hetero_dir_draw(labels, np.arange(int(num_classes)), int(num_clients), float(alpha), rng)
        if parts is not None and min(p.shape[0] for p in parts) >= int(min_size):
            return parts
    raise FedsimError(
        f"no hetero-dir draw in {MAX_REDRAWS} tries gave all {num_clients} clients >= {min_size} "
        f"examples (alpha={alpha}); use fewer clients or a larger data.alpha"
    )


def class_counts(labels: np.ndarray, client_indices: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Examples of each class held by each client.

    Args:
        labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        client_indices: J int64 index arrays into ``labels``.
        num_classes: K.

    Returns:
        ``(J, K)`` int64; row j sums to ``len(client_indices[j])``.

    Raises:
        FedsimError: a label lies outside ``[0, num_classes)``.
    """
    labels = np.asarray(labels)
    out = np.zeros((len(client_indices), int(num_classes)), dtype=np.int64)
    for j, idx in enumerate(client_indices):
        lab = labels[np.asarray(idx, dtype=np.int64)]
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise FedsimError(
                f"client {j} has a label outside [0, {num_classes}); check the dataset's num_classes"
            )
        out[j] = np.bincount(lab.astype(np.int64), minlength=int(num_classes))
    return out
