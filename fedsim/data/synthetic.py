"""Synthetic(alpha, beta): the FedProx paper's generated benchmark, for any number of clients.

Source: Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in Heterogeneous
Networks" (FedProx), MLSys 2020, section 5.1 and appendix C.1, and the generator in the authors'
code (``generate_synthetic.py``). For client k:

* size: ``s_k = floor(LogNormal(4, 2)) + 50`` examples (a power law), of which the client trains
  on ``n_k = int(0.9 * s_k)`` (the authors' 90% per-device training share);
* model: ``u_k ~ N(0, alpha^2)``, ``W_k ~ N(u_k, 1)`` of shape (60, 10), ``b_k ~ N(u_k, 1)`` of
  shape (10,); label ``y = argmax(softmax(x W_k + b_k)) = argmax(x W_k + b_k)``;
* features: ``B_k ~ N(0, beta^2)``, ``v_k ~ N(B_k, 1)`` in R^60, ``x ~ N(v_k, Sigma)`` with
  ``Sigma = diag(d^-1.2)`` for d = 1..60.

The paper writes ``u_k ~ N(0, alpha)``; the authors' code draws ``normal(0, alpha)``, i.e. alpha is
the standard deviation. fedsim follows the code (it produced every published Synthetic result).
Note that u_k enters every entry of W_k and b_k alike, so it shifts all ten logits by the same
amount and never changes a label: as in the original, per-client model heterogeneity comes from
the unit-variance entries of W_k and b_k (different for every client whatever alpha is), and alpha
changes nothing but those constant shifts. beta moves each client's feature mean.

Partition: ``natural`` (each client holds its own generated data); no other partition applies.

Randomness and memory. Client k's data is a pure function of (seed, k, alpha, beta): its size,
u_k, B_k, v_k, W_k, b_k and then its examples are drawn from ``numpy_rng(seed, "data", round=0,
client=k)`` in that order (alpha and beta only scale draws), so adding clients never changes
existing ones. Labels are kept; features are not: the training split (:class:`SyntheticSplit`)
rebuilds a client's features from its streams whenever a worker asks for them. Memory is
O(total examples) at 16 bytes per example (int64 label and int64 index) instead of 256 for stored
features, and generation streams one client at a time.

Speed. A label depends on z ~ N(0, I_60) (x = v_k + Sigma^(1/2) z) only through its projection on
the 10-dimensional span of Sigma^(1/2) W_k. With the complete QR factorisation
Sigma^(1/2) W_k = Q R, (a, c) = z Q is again N(0, I_60); fedsim draws a ``(n, 10)`` from the
client's stream (enough for the labels: logits = v_k W_k + b_k + a R[:10]) and, only when features
are needed, c ``(n, 50)`` from ``numpy_rng(seed, "data", round=3, client=k)``, and sets
z = [a c] Q^T. The examples have exactly the distribution of the direct recipe, and loading draws
10 instead of 60 normals per example.

Test set: a separate draw of :data:`TEST_EXAMPLES` examples from the mixture that the union of
per-client held-out splits follows: client k contributes ``m_k ~ Multinomial(M, n_k / sum n)``
examples (allocation from ``numpy_rng(seed, "data", round=1)``), drawn from client k's own
distribution (x by the direct recipe, then its label), clients in increasing order, all from the
one stream ``numpy_rng(seed, "data", round=2)``. Its size does not grow with the client count, so evaluation costs the same for 10 or 10,000 clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsim.data.base import FederatedDataset, Split
from fedsim.errors import FedsimError
from fedsim.rng import numpy_rng

#: Features per example and classes (FedProx, section 5.1).
DIM = 60
NUM_CLASSES = 10
INPUT_SHAPE = (DIM,)
#: Client sizes: floor(LogNormal(SIZE_LOG_MEAN, SIZE_LOG_STD)) + SIZE_MIN total examples.
SIZE_LOG_MEAN = 4.0
SIZE_LOG_STD = 2.0
SIZE_MIN = 50
#: Share of a client's examples it trains on (the authors' 90/10 per-device split).
TRAIN_SHARE = 0.9
#: Examples in the global test set.
TEST_EXAMPLES = 10_000
#: Standard deviation of feature d (1-based): sqrt(d^-1.2), Sigma's diagonal square root.
FEATURE_STD = np.power(np.arange(1, DIM + 1, dtype=np.float64), -0.6)
_STD64 = FEATURE_STD
#: Clients whose factors are computed in one batched call while loading.
_BLOCK = 1024
#: Rows of features built at once when a client is regenerated (bounds temporary memory).
_CHUNK = 4096

# Values of the "round" slot of numpy_rng(seed, "data", round, client) used as sub-streams.
_CLIENT_STREAM, _TEST_ALLOCATION_STREAM, _TEST_STREAM, _COMPLEMENT_STREAM = 0, 1, 2, 3


@dataclass(frozen=True)
class ClientModel:
    """One client's generating parameters (float64).

    Attributes:
        n_train: training examples the client holds.
        w: ``(60, 10)`` weights W_k; b: ``(10,)`` biases b_k; v: ``(60,)`` feature mean v_k.
    """

    n_train: int
    w: np.ndarray
    b: np.ndarray
    v: np.ndarray


def _check(num_clients, alpha, beta, examples_per_client, test_examples) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise FedsimError(f"data.num_clients must be an integer >= 1 (got {num_clients!r}); use e.g. 100")
    for key, v in (("data.synthetic_alpha", alpha), ("data.synthetic_beta", beta)):
        ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
        if not ok or not math.isfinite(v) or v < 0:
            raise FedsimError(f"{key} must be a finite number >= 0 (got {v!r}); FedProx uses 0, 0.5 or 1")
    epc = examples_per_client
    if epc is not None and (isinstance(epc, bool) or not isinstance(epc, (int, np.integer)) or epc < 1):
        raise FedsimError(
            f"data.examples_per_client must be an integer >= 1 (got {epc!r}); "
            "use a positive count or leave it unset for log-normal sizes"
        )
    if (
        isinstance(test_examples, bool)
        or not isinstance(test_examples, (int, np.integer))
        or test_examples < 1
    ):
        raise FedsimError(f"test_examples must be an integer >= 1 (got {test_examples!r})")


def _train_size(rng: np.random.Generator, examples_per_client: int | None) -> int:
    """First draw of a client stream: its size (consumed even when the size is fixed)."""
    total = int(rng.lognormal(SIZE_LOG_MEAN, SIZE_LOG_STD)) + SIZE_MIN
    return int(examples_per_client) if examples_per_client is not None else int(TRAIN_SHARE * total)


def _client(
    seed: int, client: int, alpha: float, beta: float, examples_per_client: int | None
) -> tuple[ClientModel, np.random.Generator]:
    """Client ``client``'s model and its stream, positioned at the feature draws."""
    rng = numpy_rng(seed, "data", _CLIENT_STREAM, client)
    return _client_params(rng, _train_size(rng, examples_per_client), alpha, beta)


def _client_params(
    rng: np.random.Generator, n: int, alpha: float, beta: float
) -> tuple[ClientModel, np.random.Generator]:
    """Draws after the size: u_k, B_k, v_k, W_k, b_k (in this order)."""
    u = alpha * rng.standard_normal()
    big_b = beta * rng.standard_normal()
    v = big_b + rng.standard_normal(DIM)
    w = u + rng.standard_normal((DIM, NUM_CLASSES))
    b = u + rng.standard_normal(NUM_CLASSES)
    return ClientModel(n_train=n, w=w, b=b, v=v), rng


def client_model(
    seed: int, client: int, alpha: float = 1.0, beta: float = 1.0, examples_per_client: int | None = None
) -> ClientModel:
    """The generating parameters of client ``client`` (see the module docstring).

    Raises:
        FedsimError: negative or non-finite alpha or beta, bad ``examples_per_client``.
    """
    _check(1, alpha, beta, examples_per_client, 1)
    return _client(seed, int(client), float(alpha), float(beta), examples_per_client)[0]


def _factors(w: np.ndarray, b: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logit mean and factor of K clients: ``mu`` ``(K, 10)`` and upper-triangular ``r`` ``(K, 10, 10)``.

    With M = Sigma^(1/2) W_k ``(60, 10)``, R is the Cholesky factor of M^T M (R^T R = M^T M),
    i.e. the R of M's thin QR factorisation M = Q_1 R. Logits of x = v + Sigma^(1/2) z are
    x W + b = mu + (z Q_1) R with mu = v W + b, and z Q_1 ~ N(0, I_10).

    Args:
        w: ``(K, 60, 10)``; b: ``(K, 10)``; v: ``(K, 60)``; float64.
    """
    m = _STD64[None, :, None] * w  # (K, 60, 10)
    r = np.linalg.cholesky(np.matmul(m.transpose(0, 2, 1), m)).transpose(0, 2, 1)  # (K, 10, 10)
    mu = np.matmul(v[:, None, :], w)[:, 0, :] + b  # (K, 10)
    return mu, r


def _labels_from_draws(a: np.ndarray, mu: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``(n,)`` int64 argmax of the logits mu + a R for logit-space draws a ``(n, 10)`` float32."""
    return np.argmax(mu + a.astype(np.float64) @ r, axis=1).astype(np.int64)


def _client_features(seed: int, client: int, rng: np.random.Generator, model: ClientModel) -> np.ndarray:
    """Client features ``(n, 60)`` float32 whose labels are those :func:`load_synthetic` stored.

    Draws the same a ``(n, 10)`` from ``rng`` (positioned after the parameters), the complement
    c ``(n, 50)`` from ``numpy_rng(seed, "data", 3, client)``, and sets z = a Q_1^T + c Q_2^T with
    Q_1 = M R^-1 (orthonormal columns, from :func:`_factors`) and Q_2 an orthonormal basis of its
    complement, so z ~ N(0, I_60) and x = v + Sigma^(1/2) z.
    """
    _, r = _factors(model.w[None], model.b[None], model.v[None])
    m = _STD64[:, None] * model.w  # (60, 10)
    q1 = np.linalg.solve(r[0].T, m.T).T  # (60, 10) = M R^-1
    q2 = np.linalg.qr(q1, mode="complete")[0][:, NUM_CLASSES:]  # (60, 50)
    crng = numpy_rng(seed, "data", _COMPLEMENT_STREAM, client)
    n = model.n_train
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, _CHUNK):  # chunks bound the float64 temporaries; draws stay in order
        rows = min(_CHUNK, n - start)
        a = rng.standard_normal((rows, NUM_CLASSES), dtype=np.float32)
        c = crng.standard_normal((rows, DIM - NUM_CLASSES), dtype=np.float32)
        z = a.astype(np.float64) @ q1.T + c.astype(np.float64) @ q2.T  # (rows, 60) ~ N(0, I)
        out[start : start + rows] = model.v + z * _STD64
    return out


def _direct_features(rng: np.random.Generator, model: ClientModel, n: int) -> np.ndarray:
    """``(n, 60)`` float32 draws x = v + Sigma^(1/2) z, z ~ N(0, I), from ``rng`` (test set)."""
    z = rng.standard_normal((n, DIM), dtype=np.float32)
    return (model.v + z.astype(np.float64) * _STD64).astype(np.float32)


def _labels(x: np.ndarray, model: ClientModel) -> np.ndarray:
    """``(n,)`` int64 argmax(x W + b) (softmax is monotone, so it is left out)."""
    return np.argmax(x.astype(np.float64) @ model.w + model.b, axis=1).astype(np.int64)


def client_sizes(seed: int, num_clients: int, examples_per_client: int | None = None) -> np.ndarray:
    """Training examples of clients ``0..num_clients-1``: ``(J,)`` int64.

    Without ``examples_per_client``: ``int(0.9 * (floor(LogNormal(4, 2)) + 50))`` each, so at
    least 45; with it, exactly that many each.

    Raises:
        FedsimError: bad ``num_clients`` or ``examples_per_client``.
    """
    _check(num_clients, 0.0, 0.0, examples_per_client, 1)
    return np.array(
        [
            _train_size(numpy_rng(seed, "data", _CLIENT_STREAM, j), examples_per_client)
            for j in range(int(num_clients))
        ],
        dtype=np.int64,
    )


@dataclass(frozen=True)
class SyntheticSplit(Split):
    """The training split of Synthetic(alpha, beta), features regenerated on demand.

    Examples are stored client after client: client k owns rows ``offsets[k]:offsets[k+1]``. ``y``
    is the ``(N,)`` int64 labels; ``x`` is an empty ``(0, 60)`` array because features are never
    materialised (so any direct ``x[idx]`` fails loudly): call :meth:`inputs`, which rebuilds the
    owning clients' features from ``numpy_rng(seed, "data", 0, k)`` bit for bit.

    Attributes:
        offsets: ``(J + 1,)`` int64 cumulative client sizes, ``offsets[0] == 0``.
        seed, alpha, beta, examples_per_client: the generator's arguments.
    """

    offsets: np.ndarray | None = None
    seed: int = 0
    alpha: float = 1.0
    beta: float = 1.0
    examples_per_client: int | None = None

    def inputs(self, idx: np.ndarray) -> np.ndarray:
        """Features of examples ``idx`` ((B,) int64, any order, any clients): ``(B, 60)`` float32.

        Cost: one regeneration of each client that ``idx`` touches (n_k x 60 normal draws).

        Raises:
            IndexError: an index outside ``[0, N)``.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((idx.shape[0], DIM), dtype=np.float32)
        if idx.shape[0] == 0:
            return out
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"example index out of range [0, {len(self)})")
        owner = np.searchsorted(self.offsets, idx, side="right") - 1  # (B,) client of each example
        for k in np.unique(owner):
            model, rng = _client(self.seed, int(k), self.alpha, self.beta, self.examples_per_client)
            x_k = _client_features(self.seed, int(k), rng, model)  # (n_k, 60)
            rows = owner == k
            out[rows] = x_k[idx[rows] - self.offsets[k]]
        return out


def load_synthetic(
    num_clients: int,
    *,
    seed: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    examples_per_client: int | None = None,
    test_examples: int = TEST_EXAMPLES,
) -> FederatedDataset:
    """Generate Synthetic(alpha, beta) for ``num_clients`` clients (FedProx, MLSys 2020, sec. 5.1).

    Args:
        num_clients: J >= 1; any number (10,000 clients take a few seconds, see the module notes).
        seed: experiment seed; client k's data depends only on (seed, k, alpha, beta).
        alpha: std of u_k, the per-client shift of W_k and b_k (FedProx: 0, 0.5, 1).
        beta: std of B_k, the per-client shift of the feature mean (FedProx: 0, 0.5, 1).
        examples_per_client: fixed training size per client instead of the log-normal sizes.
        test_examples: size M of the global test set (a separate draw, see the module docstring).

    Returns:
        A :class:`FederatedDataset` named ``"synthetic"``: ``input_shape`` (60,), 10 classes,
        ``train`` a :class:`SyntheticSplit` (labels stored, features on demand), ``test`` a plain
        ``Split`` with ``(M, 60)`` float32 features, ``client_indices[k]`` the contiguous int64
        range ``offsets[k]:offsets[k+1]``, ``class_counts`` ``(J, 10)`` int64.

    Raises:
        FedsimError: J < 1, alpha or beta negative or not finite, bad ``examples_per_client`` or
            ``test_examples``.
    """
    _check(num_clients, alpha, beta, examples_per_client, test_examples)
    J, alpha, beta = int(num_clients), float(alpha), float(beta)
    rngs = [numpy_rng(seed, "data", _CLIENT_STREAM, k) for k in range(J)]
    sizes = np.array([_train_size(g, examples_per_client) for g in rngs], dtype=np.int64)  # (J,)
    offsets = np.zeros(J + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    m = numpy_rng(seed, "data", _TEST_ALLOCATION_STREAM).multinomial(
        int(test_examples), sizes / sizes.sum()
    )  # (J,) test examples per client

    y = np.empty(int(offsets[-1]), dtype=np.int64)
    counts = np.zeros((J, NUM_CLASSES), dtype=np.int64)
    test_x = np.empty((int(test_examples), DIM), dtype=np.float32)
    test_y = np.empty(int(test_examples), dtype=np.int64)
    test_rng, t = numpy_rng(seed, "data", _TEST_STREAM), 0
    for start in range(0, J, _BLOCK):
        block = range(start, min(J, start + _BLOCK))
        models = [_client_params(rngs[k], int(sizes[k]), alpha, beta)[0] for k in block]
        mu, r = _factors(
            np.stack([c.w for c in models]), np.stack([c.b for c in models]), np.stack([c.v for c in models])
        )
        for i, k in enumerate(block):
            a = rngs[k].standard_normal((int(sizes[k]), NUM_CLASSES), dtype=np.float32)
            rngs[k] = None
            y_k = _labels_from_draws(a, mu[i], r[i])
            y[offsets[k] : offsets[k + 1]] = y_k
            counts[k] = np.bincount(y_k, minlength=NUM_CLASSES)
            if m[k]:
                x_t = _direct_features(test_rng, models[i], int(m[k]))
                test_x[t : t + m[k]] = x_t
                test_y[t : t + m[k]] = _labels(x_t, models[i])
                t += int(m[k])

    all_idx = np.arange(int(offsets[-1]), dtype=np.int64)
    train = SyntheticSplit(
        x=np.empty((0, DIM), dtype=np.float32),
        y=y,
        offsets=offsets,
        seed=int(seed),
        alpha=alpha,
        beta=beta,
        examples_per_client=examples_per_client,
    )
    return FederatedDataset(
        name="synthetic",
        train=train,
        test=Split(x=test_x, y=test_y),
        num_classes=NUM_CLASSES,
        input_shape=INPUT_SHAPE,
        client_indices=[all_idx[offsets[k] : offsets[k + 1]] for k in range(J)],
        class_counts=counts,
        augment=None,
        client_names=[],
    )
