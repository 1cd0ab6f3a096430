"""The codec contract, over every registered codec (optax-style): round trip, bytes, unbiasedness.

Expected sizes are written here from the formulas in docs/compression.md, not taken from the
codecs' own ``size``; expected round trips from numpy / torch casts and hand-computed values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.wire import CODECS, make_codec
from fedsim.wire.codecs import pack_uint, unpack_uint

#: one configured instance per registered codec (a new codec must be added here)
PARAMS = {
    "raw": {},
    "fp16": {},
    "bf16": {},
    "quantize": {"bits": 3},
    "qsgd": {"levels": 5},
    "topk": {"fraction": 0.1},
    "randk": {"fraction": 0.25},
    "sign": {},
    "powersgd": {"rank": 2},
}

SHAPES = [(), (1,), (7,), (5, 3), (16, 3, 3, 3), (40, 30), (3, 1000)]


def expected_size(name: str, shape: tuple[int, ...]) -> int:
    """The docs' size formulas, independently of the codecs' code."""
    d = math.prod(shape)
    h = 2 + 4 * len(shape)
    p = PARAMS[name]
    if name == "raw":
        return h + 1 + 4 * d
    if name in ("fp16", "bf16"):
        return h + 2 * d
    if name == "quantize":
        return h + 8 + math.ceil(d * p["bits"] / 8)
    if name == "qsgd":
        return h + 4 + math.ceil(d * (1 + math.ceil(math.log2(p["levels"] + 1))) / 8)
    k = math.ceil(p.get("fraction", 0) * d)
    if name == "topk":
        w = max(1, math.ceil(math.log2(d))) if d > 1 else 1
        return h + 1 + 4 * k + min(math.ceil(d / 8), math.ceil(k * w / 8))
    if name == "randk":
        return h + 8 + 4 * k
    if name == "sign":
        return h + 4 + math.ceil(d / 8)
    if name == "powersgd":
        if len(shape) < 2:
            return h + 4 * d
        n, m = shape[0], d // shape[0]
        return h + 4 * min(p["rank"], n, m) * (n + m)
    raise AssertionError(f"no size formula for codec {name!r} in this test")


def codec(name):
    return make_codec(name, **PARAMS[name])


def sample(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_every_registered_codec_is_covered():
    assert set(CODECS) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("shape", SHAPES)
def test_len_encoded_equals_size_formula_and_projection(name, shape):
    c = codec(name)
    data = c.encode(sample(shape), np.random.default_rng(1))
    assert len(data) == expected_size(name, shape) == c.size(shape)
    out = c.decode(data)
    assert out.shape == shape and out.dtype == np.float32


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_decode_rejects_another_codecs_message(name):
    other = "fp16" if name != "fp16" else "bf16"
    with pytest.raises(ValueError, match="cannot read"):
        codec(name).decode(codec(other).encode(sample((4,))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.bool_, np.uint8])
def test_raw_is_lossless_for_every_dtype(dtype):
    x = (np.random.default_rng(0).standard_normal((3, 4)) * 100).astype(dtype)
    out = codec("raw").decode(codec("raw").encode(x))
    assert out.dtype == x.dtype and np.array_equal(out, x)


def test_fp16_is_the_plain_cast():
    x = np.concatenate([sample((1000,)), [1e-8, 7e4, -7e4, 0.0, 1 + 2**-11, np.inf]]).astype(np.float32)
    out = codec("fp16").decode(codec("fp16").encode(x))
    with np.errstate(over="ignore"):  # 7e4 overflows to inf in the cast too
        np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))


def test_bf16_is_the_plain_cast():
    x = np.concatenate([sample((1000,)) * 1e3, [0.0, -0.0, np.inf, -np.inf, 3e38]]).astype(np.float32)
    out = codec("bf16").decode(codec("bf16").encode(x))
    np.testing.assert_array_equal(out, torch.from_numpy(x).bfloat16().float().numpy())
    # by hand: 8 significant bits; 1 + 2^-8 is a tie and rounds to even (1.0), 1 + 3 * 2^-8 up
    hand = codec("bf16").decode(codec("bf16").encode(np.array([1 + 2**-8, 1 + 3 * 2**-8], np.float32)))
    np.testing.assert_array_equal(hand, [1.0, 1 + 2**-6])
    assert np.isnan(codec("bf16").decode(codec("bf16").encode(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8, 13, 16, 17])
@pytest.mark.parametrize("count", [1, 8, 37])
def test_bit_packing_is_numpys_msb_first_bit_stream_and_round_trips(width, count):
    q = np.random.default_rng(width).integers(0, 2**width, size=count).astype(np.uint32)
    data = pack_uint(q, width)
    assert len(data) == math.ceil(count * width / 8)
    # the bit stream written by hand: each value's bits, most significant first, zero-padded
    stream = "".join(format(int(v), f"0{width}b") for v in q)
    stream += "0" * (-len(stream) % 8)
    assert data == bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8))
    np.testing.assert_array_equal(unpack_uint(data, count, width), q)


def test_topk_keeps_the_largest_magnitudes_exactly():
    x = np.zeros(100, np.float32)
    x[[3, 50, 97]] = [-5.0, 4.0, 6.0]
    x[10] = 0.5
    c = make_codec("topk", fraction=0.03)
    np.testing.assert_array_equal(c.decode(c.encode(x)), np.where(np.abs(x) >= 4, x, 0))


def test_topk_index_coding_is_the_cheaper_one():
    # d = 1000: bitmap 125 bytes; k = 10 packed 10-bit positions 13 bytes, k = 500 -> 625 bytes
    for fraction, index_bytes in ((0.01, 13), (0.5, 125)):
        c = make_codec("topk", fraction=fraction)
        k = math.ceil(fraction * 1000)
        data = c.encode(sample((1000,)))
        assert len(data) == 2 + 4 + 1 + 4 * k + index_bytes
        assert data[6] == (index_bytes == 125)  # the flag byte: 1 = bitmap


def test_sign_is_scaled_sign():
    x = np.array([2.0, -1.0, 0.0, -5.0], np.float32)
    out = codec("sign").decode(codec("sign").encode(x))
    np.testing.assert_allclose(out, [2.0, -2.0, 2.0, -2.0])  # ||x||_1 / d = 2


def test_powersgd_is_exact_on_a_matrix_of_its_rank():
    rng = np.random.default_rng(0)
    m = (rng.standard_normal((20, 2)) @ rng.standard_normal((2, 30))).astype(np.float32)
    c = make_codec("powersgd", rank=2)
    np.testing.assert_allclose(c.decode(c.encode(m, rng)), m, atol=1e-4)
    # a vector is sent as float32, exactly
    v = sample((9,))
    np.testing.assert_array_equal(c.decode(c.encode(v, rng)), v)


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    """Repeated encodings of one matrix, each warm-started from the last Q, are power iterations:
    the error approaches the best rank-1 error (Eckart-Young: the second singular value)."""
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((30, 20)))
    v, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    m = (u * np.geomspace(10, 0.1, 20)) @ v.T  # singular values 10 ... 0.1: a clear gap
    m = m.astype(np.float32)
    c = make_codec("powersgd", rank=1)
    warm = None
    for _ in range(30):
        data = c.encode(m, rng, warm)
        warm = c.carry(data)
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    err = np.linalg.norm(c.decode(data) - m)
    assert err == pytest.approx(np.sqrt((s[1:] ** 2).sum()), rel=1e-3)


@pytest.mark.parametrize("name", [n for n in sorted(PARAMS) if CODECS[n].unbiased and not CODECS[n].lossless])
def test_stochastic_codecs_are_unbiased(name):
    """Mean of N = 4000 decodings, each with its own generator, against x: every coordinate within
    5 standard errors (its empirical standard deviation / sqrt(N)) plus 1e-6 for float32 rounding.
    With 40 coordinates the chance that an unbiased codec fails is about 40 x 6e-7."""
    x = sample((40,), seed=7)
    x[5] = 0.0
    c = codec(name)
    n = 4000
    draws = np.stack([c.decode(c.encode(x, np.random.default_rng(i))) for i in range(n)]).astype(np.float64)
    se = draws.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(draws.mean(axis=0) - x) <= 5 * se + 1e-6)


def test_quantize_rounds_to_neighbouring_grid_points():
    x = sample((500,))
    c = make_codec("quantize", bits=2)
    out = c.decode(c.encode(x, np.random.default_rng(0)))
    step = (x.max() - x.min()) / 3
    grid = x.min() + step * np.arange(4)
    assert np.all(np.min(np.abs(out[:, None] - grid[None, :]), axis=1) < 1e-5)
    assert np.all(np.abs(out - x) <= step + 1e-5)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("quantize", {"bits": 0}),
        ("quantize", {"bits": 17}),
        ("qsgd", {"levels": 0}),
        ("topk", {"fraction": 0.0}),
        ("randk", {"fraction": 1.5}),
        ("powersgd", {"rank": 0}),
    ],
)
def test_out_of_range_parameters_raise(name, params):
    with pytest.raises(ValueError):
        make_codec(name, **params)


# ------------------------------------------------------- randomised Hadamard rotation (Suresh et al.)

ROTATED = {"quantize": {"bits": 3, "rotation": True}, "qsgd": {"levels": 5, "rotation": True}}


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fast_hadamard_is_the_sylvester_matrix_product(n):
    from scipy.linalg import hadamard as sylvester

    from fedsim.wire.codecs import hadamard

    a = np.random.default_rng(n).standard_normal(n)
    np.testing.assert_allclose(hadamard(a), sylvester(n) @ a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 5, 8, 100])
def test_rotation_is_orthogonal_and_inverted_by_unrotate(d):
    from fedsim.wire.codecs import rotate, unrotate

    x = np.random.default_rng(d).standard_normal(d)
    y = rotate(x, seed=11)
    assert y.size == 2 ** math.ceil(math.log2(d))
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(unrotate(y, 11, d), x, rtol=0, atol=1e-12)
    assert d == 1 or not np.allclose(rotate(x, seed=12), y)  # the seed draws the signs


@pytest.mark.parametrize("name", sorted(ROTATED))
@pytest.mark.parametrize("shape", SHAPES)
def test_rotated_encoding_length_is_the_padded_formula(name, shape):
    """H + 8 (the seed) + the codec's payload for d' = 2^ceil(log2 d) values (docs/compression.md)."""
    d = math.prod(shape)
    dp = 0 if d == 0 else 2 ** math.ceil(math.log2(d))
    h = 2 + 4 * len(shape)
    width = 3 if name == "quantize" else 1 + math.ceil(math.log2(5 + 1))
    scale = 8 if name == "quantize" else 4
    expected = h + 8 + scale + math.ceil(dp * width / 8)
    c = make_codec(name, **ROTATED[name])
    data = c.encode(sample(shape), np.random.default_rng(0))
    assert len(data) == expected == c.size(shape)
    assert c.decode(data).shape == shape


@pytest.mark.parametrize("name", sorted(ROTATED))
def test_rotated_codecs_are_unbiased(name):
    """As test_stochastic_codecs_are_unbiased: 4000 decodings, every coordinate within 5 standard
    errors of x (the rotation's signs are drawn afresh each time, from the encoding's generator)."""
    x = sample((40,), seed=7)
    c = make_codec(name, **ROTATED[name])
    n = 4000
    draws = np.stack([c.decode(c.encode(x, np.random.default_rng(i))) for i in range(n)]).astype(np.float64)
    se = draws.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(draws.mean(axis=0) - x) <= 5 * se + 1e-6)


def test_rotation_lowers_the_quantisation_error_of_a_spiky_vector():
    """Suresh et al. 2017's point: one large coordinate stretches the quantisation grid of every
    other; after the rotation the range, and so the mean squared error, is much smaller."""
    x = sample((1024,), seed=3) * 0.01
    x[17] = 5.0
    plain, rotated = make_codec("quantize", bits=4), make_codec("quantize", bits=4, rotation=True)

    def mse(c):
        return np.mean(
            [np.mean((c.decode(c.encode(x, np.random.default_rng(i))) - x) ** 2) for i in range(20)]
        )

    assert mse(rotated) < mse(plain) / 10
