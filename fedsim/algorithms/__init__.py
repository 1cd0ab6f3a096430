"""Algorithm registry: ``algorithm:`` name -> class. Each algorithm is one small module."""

from fedsim.algorithms.base import Algorithm, ClientContext, ClientResult, ClientTask, RoundPlan, ServerState
from fedsim.algorithms.baselines import Ensemble, EntireData, LocalModels
from fedsim.algorithms.fedavg import FedAvg
from fedsim.algorithms.fedma import PFNM, FedMA
from fedsim.algorithms.fednova import FedNova
from fedsim.algorithms.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedsim.algorithms.fedpart import FedPart
from fedsim.algorithms.fedprox import FedProx
from fedsim.algorithms.moon import MOON
from fedsim.algorithms.scaffold import Scaffold

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        MOON,
        FedPart,
        FedMA,
        PFNM,
        Ensemble,
        LocalModels,
        EntireData,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        Scaffold,
        FedNova,
    )
}

__all__ = [
    "ALGORITHMS",
    "MOON",
    "PFNM",
    "Algorithm",
    "ClientContext",
    "ClientResult",
    "ClientTask",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMA",
    "FedNova",
    "FedPart",
    "FedProx",
    "FedYogi",
    "RoundPlan",
    "Scaffold",
    "ServerState",
]
