"""Ways to split a training set across J clients, and their registry (:data:`PARTITIONERS`).

Every function takes an explicit ``numpy.random.Generator`` (build it with
``fedsim.rng.numpy_rng(seed, "partition")``) and returns ``J`` sorted, disjoint ``(n_j,)`` int64
index arrays into the training set; :func:`hetero_dir`, which must draw exactly as the FedMA
authors' code, builds its own legacy ``RandomState`` from the seed instead. Nothing else here
touches a global random state.

fedsim's own: :func:`iid`, :func:`dirichlet` (the FedMA authors' hetero-dir recipe). With the
semantics of Flower Datasets 0.6 (``flwr_datasets.partitioner``, so that a Flower user can
reproduce a split): :func:`natural_id` (``NaturalIdPartitioner``), :func:`grouped_natural_id`
(``GroupedNaturalIdPartitioner``), :func:`flwr_dirichlet`
(``DirichletPartitioner``), :func:`shard` (``ShardPartitioner``), :func:`pathological`
(``PathologicalPartitioner``) and :func:`size_skewed` (``LinearPartitioner``,
``SquarePartitioner``, ``ExponentialPartitioner``, and a power law through
``IdToSizeFncPartitioner``). Given the same generator state and the same row order they return
the same index sets as Flower's (tests/data/test_flwr_compare.py); Flower additionally shuffles each
split with seed 42 in its ``FederatedDataset`` before partitioning and shuffles the order inside
each partition, which fedsim does not (its arrays are sorted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedsim.errors import FedsimError

#: How many whole-partition redraws :func:`dirichlet` tries before it gives up.
MAX_REDRAWS = 1000

#: How many draws :func:`flwr_dirichlet` makes before it gives up: Flower's first draw and its
#: 10 resamplings (``dirichlet_partitioner.py``, ``sampling_try == 10``).
FLWR_DIRICHLET_DRAWS = 11


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


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise FedsimError(f"labels must be a 1-D array (got shape {labels.shape}); pass (N,) labels")
    return labels


def natural_id(ids: np.ndarray, num_clients: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """One client per distinct natural id (a writer, a speaking role, a user).

    Flower Datasets' ``NaturalIdPartitioner``: client j holds every example whose id is the j-th
    smallest distinct id (ids sorted as numpy sorts them: numbers by value, strings by code
    point, as Python's ``sorted`` does). ``num_clients = M`` keeps the first M ids in that order
    and leaves the other ids' examples unused (capped); None keeps every id (complete). Nothing
    is random.

    Args:
        ids: ``(N,)`` natural ids (integers or strings), one per training example.
        num_clients: M, at most the number of distinct ids; None: all of them.

    Returns:
        ``(parts, names)``: M sorted ``(n_j,)`` int64 index arrays, pairwise disjoint, and the
        ``(M,)`` ids they belong to, in client order.

    Raises:
        FedsimError: fewer than two distinct ids, M < 1, or M more than the distinct ids.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise FedsimError(
            f"natural ids must be a 1-D column (got shape {ids.shape}); pass one id per example"
        )
    names, inverse = np.unique(ids, return_inverse=True)
    if names.shape[0] < 2:
        raise FedsimError(
            f"the natural-id column has {names.shape[0]} distinct id(s), so it cannot split the data; "
            "set data.partition_by to a column with one id per client (e.g. writer_id), or use another "
            "data.partition"
        )
    m = names.shape[0] if num_clients is None else int(num_clients)
    if not 1 <= m <= names.shape[0]:
        raise FedsimError(
            f"data.num_clients={num_clients} but the natural-id column has {names.shape[0]} distinct ids; "
            f"use at most {names.shape[0]} clients, or null for all of them"
        )
    order = np.argsort(inverse, kind="stable")  # example indices grouped by id, increasing within
    ends = np.cumsum(np.bincount(inverse, minlength=names.shape[0]))
    starts = ends - np.bincount(inverse, minlength=names.shape[0])
    parts = [order[starts[j] : ends[j]].astype(np.int64) for j in range(m)]
    return parts, names[:m]


#: ``data.group_mode`` values of :func:`grouped_natural_id` (Flower's names, its spelling).
GROUP_MODES = ("allow-smaller", "allow-bigger", "drop-reminder", "strict")


def grouped_natural_id(
    ids: np.ndarray,
    group_size: int,
    mode: str = "allow-smaller",
    sort_ids: bool = False,
    num_clients: int | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """Clients that are groups of ``group_size`` natural ids (cross-silo: an organisation of users),
    as Flower Datasets' ``GroupedNaturalIdPartitioner``.

    The distinct ids, in order of first appearance (``sort_ids``: sorted), are cut into
    ``floor(M / group_size)`` consecutive groups (M distinct ids); the remainder r = M mod
    group_size is handled by ``mode``: ``allow-smaller`` adds a last group of r ids (and with
    group_size > M makes one group of all), ``allow-bigger`` spreads them over the first groups
    (``np.array_split``), ``drop-reminder`` leaves their examples unused (capped), ``strict``
    refuses r > 0. ``num_clients = G`` keeps the first G groups (capped); None keeps all. Nothing
    is random.

    Args:
        ids: ``(N,)`` natural ids.
        group_size: ids per group >= 1.
        mode: one of :data:`GROUP_MODES`.
        sort_ids: sort the distinct ids before grouping.
        num_clients: G, at most the number of groups; None: all of them.

    Returns:
        ``(parts, names)``: G sorted ``(n_j,)`` int64 index arrays, pairwise disjoint, and each
        group's ids joined by ``+``.

    Raises:
        FedsimError: group_size < 1, an unknown mode, group_size > M outside ``allow-smaller``,
            r > 0 in ``strict``, or G outside [1, groups].
    """
    ids = np.asarray(ids)
    if int(group_size) < 1:
        raise FedsimError(f"data.group_size must be >= 1 (got {group_size}); use e.g. 10 ids per client")
    if mode not in GROUP_MODES:
        raise FedsimError(f"unknown data.group_mode {mode!r}; use one of {', '.join(GROUP_MODES)}")
    names, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.arange(names.shape[0]) if sort_ids else np.argsort(first, kind="stable")
    m, size = order.shape[0], int(group_size)
    if mode != "allow-smaller" and size > m:
        raise FedsimError(
            f"data.group_size={size} exceeds the {m} distinct ids; lower it or set data.group_mode: allow-smaller"
        )
    count, rest = divmod(m, size)
    if count == 0:  # allow-smaller with one group of every id
        count, rest = 1, 0
    if mode == "strict" and rest:
        raise FedsimError(
            f"data.group_mode=strict but {m} ids do not divide into groups of {size} (remainder {rest}); "
            "choose a divisor of the id count or another data.group_mode"
        )
    if mode == "allow-bigger" or mode == "strict":
        groups = np.array_split(order, count)
    else:
        groups = np.array_split(order[: count * size], count)
        if mode == "allow-smaller" and rest:
            groups.append(order[-rest:])
    g = len(groups) if num_clients is None else int(num_clients)
    if not 1 <= g <= len(groups):
        raise FedsimError(
            f"data.num_clients={num_clients} but the ids make {len(groups)} groups; use at most "
            f"{len(groups)} clients, or null for all of them"
        )
    by_id = np.argsort(inverse, kind="stable")
    ends = np.cumsum(np.bincount(inverse, minlength=m))
    starts = ends - np.bincount(inverse, minlength=m)
    parts = [
        np.sort(np.concatenate([by_id[starts[i] : ends[i]] for i in grp])).astype(np.int64)
        for grp in groups[:g]
    ]
    return parts, ["+".join(str(names[i]) for i in grp) for grp in groups[:g]]


def flwr_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_partition_size: int = 10,
    self_balancing: bool = False,
) -> list[np.ndarray]:
    """Label skew by Dirichlet proportions, as Flower Datasets' ``DirichletPartitioner`` draws it.

    The recipe of Hsu, Qi and Brown (2019) in Flower's form (``dirichlet_partitioner.py``): for each
    class k in sorted order, p ~ Dir(alpha * 1_J); with ``self_balancing`` every client already
    holding strictly more than N / J examples gets p_j = 0 and p is renormalised; the class's
    examples, in dataset order (not shuffled), are cut at ``int(cumsum(p) * n_k)``. The whole
    partition is redrawn, continuing the same generator, until every client holds at least
    ``min_partition_size`` examples, at most :data:`FLWR_DIRICHLET_DRAWS` draws in all. Every
    example is assigned (complete).

    How it differs from :func:`dirichlet`: no shuffle inside a class, balancing optional and by
    ``>`` instead of ``>=`` the average, and 11 draws instead of 1,000.

    Args:
        labels: ``(N,)`` integer class labels.
        num_clients: J, 1 <= J <= N.
        alpha: Dirichlet concentration > 0 (the same for every client).
        rng: the ``"partition"`` stream generator (Flower: ``np.random.default_rng(seed)``).
        min_partition_size: smallest client a draw may leave (Flower's default 10).
        self_balancing: stop giving examples to clients above the average size.

    Returns:
        J sorted ``(n_j,)`` int64 index arrays, pairwise disjoint, whose union is ``0..N-1``.

    Raises:
        FedsimError: alpha <= 0, J < 1, J > N, or no draw of 11 gave every client
            ``min_partition_size`` examples.
    """
    labels = _check_labels(labels)
    n = int(labels.shape[0])
    if not (np.isfinite(alpha) and float(alpha) > 0.0):
        raise FedsimError(f"data.alpha must be > 0 (got {alpha}); use a positive Dirichlet alpha such as 0.5")
    _check_clients(n, num_clients)
    j_count = int(num_clients)
    concentration = np.full(j_count, float(alpha))
    average = n / j_count
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for _ in range(FLWR_DIRICHLET_DRAWS):
        pieces: list[list[np.ndarray]] = [[] for _ in range(j_count)]
        held = np.zeros(j_count, dtype=np.int64)
        for idx_k in by_class:
            p = rng.dirichlet(concentration)
            if self_balancing:
                # Flower renormalises with Python's sum over the (zeroed) proportions; the same
                # operations in the same order keep the cut points bit-identical to its.
                props = [p[j] if held[j] <= average else 0 for j in range(j_count)]
                total = sum(props)
                p = np.array([x / total for x in props], dtype=np.float64)
            cuts = (np.cumsum(p) * idx_k.shape[0]).astype(int)[:-1]
            for j, piece in enumerate(np.split(idx_k, cuts)):
                pieces[j].append(piece)
                held[j] += piece.shape[0]
        if held.min() >= int(min_partition_size):
            return [np.sort(np.concatenate(ps)).astype(np.int64) for ps in pieces]
    raise FedsimError(
        f"no Dirichlet draw in {FLWR_DIRICHLET_DRAWS} tries gave all {j_count} clients >= "
        f"{min_partition_size} examples (alpha={alpha}); raise data.alpha, lower "
        "data.min_partition_size or data.num_clients"
    )


def shard(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    shards_per_client: int | None = None,
    shard_size: int | None = None,
    keep_incomplete_shard: bool = False,
) -> list[np.ndarray]:
    """Sort-and-shard label skew (McMahan et al., AISTATS 2017, section 3: MNIST sorted by digit,
    cut into 200 shards of 300, two shards per client), as Flower Datasets' ``ShardPartitioner``.

    The examples are sorted by label (stable, so ties keep dataset order) and cut into shards of
    ``shard_size`` consecutive sorted examples; ``rng.permutation`` of the usable shards deals
    them out, client 0 first.

    * ``shards_per_client = s`` given: J * s shards are used. Without ``shard_size`` it is
      ``int(N / (J * s))``; with it, J * s * shard_size must fit in N. Unused shards (and the
      remainder) are left out (capped).
    * only ``shard_size`` given: every complete shard is used (with ``keep_incomplete_shard``
      also the last, shorter one, so the partition is complete); each client gets
      ``int(shards / J)`` and the first ``shards mod J`` clients one more.

    Args:
        labels: ``(N,)`` integer labels.
        num_clients: J >= 1.
        rng: the ``"partition"`` stream generator.
        shards_per_client: s >= 1, or None.
        shard_size: examples per shard >= 1, or None (then ``shards_per_client`` is required).
        keep_incomplete_shard: also deal the last, incomplete shard.

    Returns:
        J sorted ``(n_j,)`` int64 index arrays, pairwise disjoint; a client of s shards of size
        z holds s * z examples (the incomplete shard fewer).

    Raises:
        FedsimError: J < 1, J > N, neither s nor shard_size, a shard size below 1, J * s *
            shard_size > N, or fewer usable shards than clients.
    """
    labels = _check_labels(labels)
    n = int(labels.shape[0])
    _check_clients(n, num_clients)
    j_count = int(num_clients)
    for key, value in (("shards_per_client", shards_per_client), ("shard_size", shard_size)):
        if value is not None and int(value) < 1:
            raise FedsimError(f"data.{key} must be >= 1 (got {value}); use a positive count or null")
    if shards_per_client is not None:
        used = j_count * int(shards_per_client)
        per_client = np.full(j_count, int(shards_per_client))
        if shard_size is None:
            size = int(n / used)
            if size < 1:
                raise FedsimError(
                    f"{j_count} clients x data.shards_per_client={shards_per_client} shards exceed the "
                    f"{n} examples; lower data.shards_per_client or data.num_clients"
                )
            usable = -(-n // size) if keep_incomplete_shard else n // size
        else:
            size = int(shard_size)
            if used * size > n:
                raise FedsimError(
                    f"{j_count} clients x data.shards_per_client={shards_per_client} x "
                    f"data.shard_size={shard_size} = {used * size} exceeds the {n} examples; "
                    "lower one of them"
                )
            usable = n // size
    elif shard_size is not None:
        size = int(shard_size)
        used = -(-n // size) if keep_incomplete_shard else n // size
        usable = used
        per_client = np.full(j_count, used // j_count)
        per_client[: used - j_count * (used // j_count)] += 1
    else:
        raise FedsimError(
            "data.partition=shard needs data.shards_per_client or data.shard_size; set e.g. "
            "data.shards_per_client: 2 (McMahan et al.'s two shards per client)"
        )
    if usable < j_count:
        raise FedsimError(
            f"data.shard_size={size} gives {usable} shards for {j_count} clients, so some would be "
            "empty; lower data.shard_size or data.num_clients"
        )
    order = np.argsort(labels, kind="stable")
    dealt = rng.permutation(usable)[:used]
    out = []
    for shards in np.split(dealt, np.cumsum(per_client)[:-1]):
        pos = [np.arange(s * size, min((s + 1) * size, n)) for s in shards]
        out.append(np.sort(order[np.concatenate(pos)]).astype(np.int64))
    return out


#: ``data.class_assignment_mode`` values of :func:`pathological` (Flower's names).
CLASS_ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")


def pathological(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    classes_per_client: int,
    class_assignment_mode: str = "random",
) -> list[np.ndarray]:
    """k classes per client ("pathological non-IID", McMahan et al. 2017; FedAvg/FedProx
    benchmarks), as Flower Datasets' ``PathologicalPartitioner``.

    Classes are sorted; each client j is given k distinct classes:

    * ``random``: ``rng.choice(classes, k, replace=False)``;
    * ``deterministic``: classes ``j, j+1, ..., j+k-1`` (mod K);
    * ``first-deterministic``: class ``j mod K``, then random draws ``rng.choice(classes)``
      until k are distinct.

    Each class's examples, in dataset order, are cut by ``np.array_split`` into as many nearly
    equal pieces as clients hold the class, dealt in client order. Classes no client holds stay
    unused (capped); otherwise the partition is complete.

    Args:
        labels: ``(N,)`` integer labels.
        num_clients: J >= 1.
        rng: the ``"partition"`` stream generator.
        classes_per_client: k, 1 <= k <= K.
        class_assignment_mode: one of :data:`CLASS_ASSIGNMENT_MODES`.

    Returns:
        J sorted ``(n_j,)`` int64 index arrays, pairwise disjoint; client j's labels are exactly
        its k classes.

    Raises:
        FedsimError: J < 1, J > N, k outside [1, K], an unknown mode, or a class held by more
            clients than it has examples.
    """
    labels = _check_labels(labels)
    n = int(labels.shape[0])
    _check_clients(n, num_clients)
    classes = np.unique(labels)
    k = int(classes_per_client)
    if not 1 <= k <= classes.shape[0]:
        raise FedsimError(
            f"data.classes_per_client={classes_per_client} but the training set has {classes.shape[0]} "
            f"classes; use 1 to {classes.shape[0]}"
        )
    if class_assignment_mode not in CLASS_ASSIGNMENT_MODES:
        raise FedsimError(
            f"unknown data.class_assignment_mode {class_assignment_mode!r}; use one of "
            f"{', '.join(CLASS_ASSIGNMENT_MODES)}"
        )
    held: list[list[Any]] = []
    for j in range(int(num_clients)):
        if class_assignment_mode == "random":
            held.append(rng.choice(classes, size=k, replace=False).tolist())
        elif class_assignment_mode == "deterministic":
            held.append([classes[(j + i) % classes.shape[0]] for i in range(k)])
        else:
            mine = [classes[j % classes.shape[0]]]
            while len(mine) < k:
                c = rng.choice(classes, size=1)[0]
                if c not in mine:
                    mine.append(c)
            held.append(mine)
    pieces: list[list[np.ndarray]] = [[] for _ in held]
    for c in classes:
        holders = [j for j, mine in enumerate(held) if c in mine]
        if not holders:
            continue
        idx_c = np.flatnonzero(labels == c)
        if len(holders) > idx_c.shape[0]:
            raise FedsimError(
                f"class {c} goes to {len(holders)} clients but has {idx_c.shape[0]} examples; lower "
                "data.num_clients or data.classes_per_client, or set data.class_assignment_mode: "
                "deterministic"
            )
        for j, piece in zip(holders, np.array_split(idx_c, len(holders)), strict=True):
            pieces[j].append(piece)
    return [np.sort(np.concatenate(ps)).astype(np.int64) for ps in pieces]


#: Size-skew laws of :func:`size_skewed`: client j = 1..J gets units f(j).
SIZE_LAWS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "linear": lambda j, _: j,
    "square": lambda j, _: np.square(j),
    "exponential": lambda j, _: np.exp(j),
    "power_law": lambda j, a: np.power(j, a),
}


def size_skewed(
    n_examples: int,
    num_clients: int,
    rng: np.random.Generator,
    law: str,
    exponent: float = 1.0,
) -> list[np.ndarray]:
    """Quantity skew: i.i.d. content, client sizes growing with the client id.

    Flower Datasets' ``IdToSizeFncPartitioner`` family (``LinearPartitioner``,
    ``SquarePartitioner``, ``ExponentialPartitioner``): with ids j = 1..J, units
    u_j = j, j^2, e^j, or j^a (``power_law``, a = ``exponent``; a = 1 is linear, a = 2 square);
    client j-1 gets ``floor(u_j / sum(u) * N)`` examples and the last client also the remainder,
    so the partition is complete. The examples are ``rng.permutation(N)`` cut into contiguous
    runs of those sizes in client order (Flower cuts the rows in order after its
    ``FederatedDataset`` shuffled them; with ``rng = np.random.default_rng(42)`` the two agree).

    Args:
        n_examples: N.
        num_clients: J >= 1.
        rng: the ``"partition"`` stream generator.
        law: a key of :data:`SIZE_LAWS`.
        exponent: a > 0 for ``power_law``; ignored otherwise.

    Returns:
        J sorted ``(n_j,)`` int64 index arrays, pairwise disjoint, whose union is ``0..N-1``.

    Raises:
        FedsimError: unknown law, J < 1, J > N, a <= 0, or a client that would get no example.
    """
    if law not in SIZE_LAWS:
        raise FedsimError(f"unknown size law {law!r}; use one of {', '.join(SIZE_LAWS)}")
    _check_clients(n_examples, num_clients)
    if law == "power_law" and not (np.isfinite(exponent) and exponent > 0):
        raise FedsimError(f"data.power_law_exponent must be > 0 (got {exponent}); use e.g. 1.5")
    n, j_count = int(n_examples), int(num_clients)
    with np.errstate(over="ignore"):
        units = SIZE_LAWS[law](np.linspace(start=1, stop=j_count, num=j_count), float(exponent))
    sizes = np.zeros(j_count, dtype=np.int64)
    if np.isfinite(units.sum()):
        sizes = np.array(units / units.sum() * n, dtype=np.int64)
        sizes[-1] += n - int(sizes.sum())
    if sizes.min() < 1:
        raise FedsimError(
            f"data.partition={law} over {j_count} clients of {n} examples leaves a client without "
            "examples; use fewer clients or a gentler size law"
        )
    perm = rng.permutation(n).astype(np.int64)
    return [np.sort(s) for s in np.split(perm, np.cumsum(sizes)[:-1])]


#: A registered partitioner: ``(labels, ids, num_clients, rng, options) -> J index arrays``.
#: ``labels`` is ``(N,)`` int64, ``ids`` the ``(N,)`` natural ids or None, ``num_clients`` J (None
#: only where the partitioner derives it, as ``natural`` does), ``options`` the ``data:`` section
#: (:class:`fedsim.config.DataConfig`, or anything with its attributes).
PartitionFn = Callable[
    [np.ndarray, "np.ndarray | None", "int | None", np.random.Generator, Any], list[np.ndarray]
]

#: Partition name -> partitioner; ``data.partition`` names one. ``bias`` (FedMA's two-client
#: grey-image split, :mod:`fedsim.data.bias`) rewrites the dataset too and is not in here.
PARTITIONERS: dict[str, PartitionFn] = {}


def register_partitioner(name: str) -> Callable[[PartitionFn], PartitionFn]:
    """Decorator adding a partitioner to :data:`PARTITIONERS` under ``name``.

    Raises:
        ValueError: ``name`` is taken.
    """

    def wrap(fn: PartitionFn) -> PartitionFn:
        if name in PARTITIONERS:
            raise ValueError(f"partitioner {name!r} is already registered")
        PARTITIONERS[name] = fn
        return fn

    return wrap


@register_partitioner("iid")
def _iid(labels, ids, num_clients, rng, o):
    return iid(labels.shape[0], num_clients, rng, examples_per_client=o.examples_per_client)


@register_partitioner("dirichlet")
def _dirichlet(labels, ids, num_clients, rng, o):
    return dirichlet(
        labels,
        num_clients,
        float(o.alpha),
        rng,
        min_size=o.min_partition_size,
        examples_per_client=o.examples_per_client,
    )


@register_partitioner("natural")
def _natural(labels, ids, num_clients, rng, o):
    if ids is None:
        raise FedsimError(
            "data.partition=natural needs natural ids: set data.partition_by to the id column "
            "(e.g. writer_id), or use another data.partition"
        )
    return natural_id(ids, num_clients)[0]


@register_partitioner("grouped_natural")
def _grouped_natural(labels, ids, num_clients, rng, o):
    if ids is None or o.group_size is None:
        raise FedsimError(
            "data.partition=grouped_natural needs data.partition_by (the id column) and data.group_size"
        )
    return grouped_natural_id(ids, o.group_size, o.group_mode, o.sort_unique_ids, num_clients)[0]


@register_partitioner("flwr_dirichlet")
def _flwr_dirichlet(labels, ids, num_clients, rng, o):
    return flwr_dirichlet(
        labels, num_clients, float(o.alpha), rng, o.min_partition_size, bool(o.self_balancing)
    )


@register_partitioner("shard")
def _shard(labels, ids, num_clients, rng, o):
    return shard(labels, num_clients, rng, o.shards_per_client, o.shard_size, o.keep_incomplete_shard)


@register_partitioner("pathological")
def _pathological(labels, ids, num_clients, rng, o):
    if o.classes_per_client is None:
        raise FedsimError(
            "data.partition=pathological needs data.classes_per_client; set it, e.g. 2 (McMahan et al.)"
        )
    return pathological(labels, num_clients, rng, o.classes_per_client, o.class_assignment_mode)


def _size_partitioner(law: str) -> PartitionFn:
    def fn(labels, ids, num_clients, rng, o):
        return size_skewed(labels.shape[0], num_clients, rng, law, float(o.power_law_exponent))

    fn.__name__ = f"_{law}"
    return fn


for _law in SIZE_LAWS:
    register_partitioner(_law)(_size_partitioner(_law))
