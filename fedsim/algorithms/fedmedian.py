"""FedMedian: coordinate-wise median aggregation (Yin, Chen, Ramchandran, Bartlett,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, the
coordinate-wise median of section 3; the ``FedMedian`` strategy researchers know from Flower).

Clients train as in FedAvg. The server sets every floating-point tensor of the global model to the
coordinate-wise median of the cohort's uploads, unweighted: with an even number of clients, the
mean of the two middle values (numpy's ``median`` convention, as Flower's ``aggregate_median``).
BatchNorm's running statistics are floating point and take the median too; integer buffers
(``num_batches_tracked``) take FedAvg's weighted mean, as in every fedsim algorithm. Traffic is
FedAvg's.
"""

from __future__ import annotations

import torch

from fedsim.algorithms.base import Algorithm, ClientResult, RoundPlan, ServerState
from fedsim.algorithms.deltas import averaged
from fedsim.algorithms.registry import register
from fedsim.config import FullNetworkConfig


def coordinate_median(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median of same-shaped float tensors: shape and dtype of each input;
    with an even count, the mean of the two middle values at each coordinate (computed in
    float64, rounded once).

    Raises:
        ValueError: ``tensors`` is empty.
    """
    if not tensors:
        raise ValueError("the median of no tensors is undefined; aggregate at least one upload")
    stacked = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    n = len(tensors)
    middle = stacked[n // 2] if n % 2 else 0.5 * (stacked[n // 2 - 1] + stacked[n // 2])
    return middle.to(tensors[0].dtype)


@register
class FedMedian(Algorithm):
    """FedAvg's clients; the server takes the coordinate-wise median of the uploads."""

    name = "fedmedian"
    Config = FullNetworkConfig
    full_network = True  # the median changes the server's arithmetic, not the traffic
    vectorizable = True

    def aggregate(self, state: ServerState, plan: RoundPlan, results: list[ClientResult]) -> ServerState:
        if plan.own_init:  # independently trained models: FedAvg's mean (FedMA App. A), as the others
            return super().aggregate(state, plan, results)
        uploads = [{k: torch.as_tensor(v) for k, v in r.upload.items()} for r in results]
        floats = [k for k, v in uploads[0].items() if v.is_floating_point()]
        median = {k: coordinate_median([u[k] for u in uploads]) for k in floats}
        rest = averaged(uploads, [r.n_examples for r in results], [k for k in uploads[0] if k not in median])
        return ServerState(params={**state.params, **median, **rest}, algo_state=state.algo_state)
