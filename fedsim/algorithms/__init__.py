"""Algorithm registry: ``algorithm:`` name -> class. Each algorithm is one small module."""

from fedsim.algorithms.base import Algorithm, ClientContext, ClientResult, ClientTask, RoundPlan, ServerState
from fedsim.algorithms.fedavg import FedAvg
from fedsim.algorithms.fedprox import FedProx

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedProx)}

__all__ = ["ALGORITHMS", "Algorithm", "ClientContext", "ClientResult", "ClientTask", "FedAvg", "FedProx",
           "RoundPlan", "ServerState"]
