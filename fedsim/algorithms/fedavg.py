"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017): local SGD from the global weights, example-weighted averaging.

All of FedAvg's behaviour is the :class:`~fedsim.algorithms.base.Algorithm` default.
"""

from fedsim.algorithms.base import Algorithm
from fedsim.algorithms.registry import register
from fedsim.config import FullNetworkConfig


@register
class FedAvg(Algorithm):
    """Federated averaging: w <- sum_j (n_j / n) w_j over the round's cohort."""

    name = "fedavg"
    Config = FullNetworkConfig
    full_network = True
    vectorizable = True
