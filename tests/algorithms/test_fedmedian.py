"""FedMedian: the coordinate-wise median against numpy's, its robustness to one outlying client,
and integer buffers averaged. The contract test covers the rest (Ray, resume, bytes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim import params as P
from fedsim.algorithms.fedmedian import coordinate_median
from tests.helpers import algorithm, result


@pytest.mark.parametrize("count", [1, 2, 3, 6])
def test_coordinate_median_equals_numpys_median(count):
    g = np.random.default_rng(count)
    arrays = [g.normal(size=(4, 3)).astype(np.float32) for _ in range(count)]
    got = coordinate_median([torch.from_numpy(a) for a in arrays])
    want = np.median(np.stack(arrays).astype(np.float64), axis=0).astype(np.float32)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)


def test_one_outlying_client_moves_the_median_not_at_all_and_the_mean_a_lot():
    algo = algorithm("fedmedian")
    honest = [{"w": torch.full((5,), v)} for v in (1.0, 2.0, 3.0, 4.0)]
    outlier = {"w": torch.full((5,), 1e6)}
    state = algo.init_state({"w": torch.zeros(5)})
    plan = algo.plan_round(state, 0, (0, 1, 2, 3, 4))
    out = algo.aggregate(state, plan, [result(j, u, 10) for j, u in enumerate([*honest, outlier])])
    assert torch.equal(out.params["w"], torch.full((5,), 3.0))  # the median of 1, 2, 3, 4, 1e6
    mean = P.weighted_mean([*honest, outlier], [10] * 5)["w"]
    assert float(mean.min()) > 1e5


def test_integer_buffers_take_fedavgs_weighted_mean():
    algo = algorithm("fedmedian")
    uploads = [{"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(t)} for t in (2, 10)]
    state = algo.init_state({k: torch.zeros_like(v) for k, v in uploads[0].items()})
    plan = algo.plan_round(state, 0, (0, 1))
    out = algo.aggregate(state, plan, [result(0, uploads[0], 3), result(1, uploads[1], 1)])
    assert out.params["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out.params["bn.num_batches_tracked"]) == (3 * 2 + 1 * 10) // 4  # floor of 4.0
