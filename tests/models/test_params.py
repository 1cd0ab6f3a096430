"""Named-tensor arithmetic: weighted mean and byte counts against independent computations."""

from __future__ import annotations

import numpy as np
import torch

from fedsim import params as P


def test_weighted_mean_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    ps = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    n = [10, 30, 60]
    out = P.weighted_mean(ps, n)
    for k in ("w", "b"):
        expect = (10 * ps[0][k].double() + 30 * ps[1][k].double() + 60 * ps[2][k].double()) / 100
        torch.testing.assert_close(out[k], expect.float())


def test_weighted_mean_of_identical_inputs_is_that_input():
    p = {"w": torch.linspace(-1, 1, 12).reshape(3, 4)}
    assert torch.equal(P.weighted_mean([p, p, p], [1, 2, 7])["w"], p["w"])


def test_weighted_mean_sums_float64_terms_in_order_for_numpy_and_torch_inputs_alike():
    g = torch.Generator().manual_seed(1)
    ps = [{"w": torch.randn(64, generator=g) * 10**i, "steps": torch.tensor(3 * i + 1)} for i in range(5)]
    n = [3, 1, 4, 1, 5]
    expect = torch.zeros(64, dtype=torch.float64)
    for p, w in zip(ps, n):  # the documented order and rounding: term by term, float64
        expect += p["w"].to(torch.float64) * (w / 14)
    from_torch = P.weighted_mean(ps, n)
    from_numpy = P.weighted_mean([{k: v.numpy() for k, v in p.items()} for p in ps], n)
    assert torch.equal(from_torch["w"], expect.to(torch.float32))
    assert torch.equal(from_numpy["w"], from_torch["w"])
    steps = sum(w * (3 * i + 1) for i, w in enumerate(n)) / 14  # 110 / 14 = 7.86: integers are floored
    assert from_numpy["steps"].dtype == torch.int64 and int(from_numpy["steps"]) == int(steps) == 7


def test_nbytes_is_numel_times_element_size():
    p = {
        "a": torch.zeros(5, 7, dtype=torch.float32),
        "b": torch.zeros(3, dtype=torch.float64),
        "c": np.zeros((2, 2), dtype=np.int32),
    }
    assert P.nbytes(p) == 5 * 7 * 4 + 3 * 8 + 4 * 4


def test_all_finite_detects_nan_and_inf():
    assert P.all_finite({"w": torch.ones(3)})
    assert not P.all_finite({"w": torch.tensor([1.0, float("nan")])})
    assert not P.all_finite({"w": torch.tensor([float("inf")])})
