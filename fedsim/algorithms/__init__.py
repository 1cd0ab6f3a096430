"""The algorithms, one small module each, and their registry (:data:`ALGORITHMS`).

Importing this package imports every module in it, and each algorithm class registers itself with
:func:`~fedsim.algorithms.registry.register`; adding an algorithm is adding its module.
"""

import importlib
import pkgutil

from fedsim.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientResult,
    ClientTask,
    RoundPlan,
    ServerState,
    StackedContext,
)
from fedsim.algorithms.registry import ALGORITHMS, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from fedsim.algorithms.baselines import Ensemble, EntireData, LocalModels  # noqa: E402
from fedsim.algorithms.fedavg import FedAvg  # noqa: E402
from fedsim.algorithms.fedma import PFNM, FedMA  # noqa: E402
from fedsim.algorithms.fednova import FedNova  # noqa: E402
from fedsim.algorithms.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi  # noqa: E402
from fedsim.algorithms.fedpart import FedPart  # noqa: E402
from fedsim.algorithms.fedprox import FedProx  # noqa: E402
from fedsim.algorithms.moon import MOON  # noqa: E402
from fedsim.algorithms.scaffold import Scaffold  # noqa: E402

__all__ = [
    "ALGORITHMS",
    "MOON",
    "PFNM",
    "Algorithm",
    "ClientContext",
    "ClientResult",
    "ClientTask",
    "Ensemble",
    "EntireData",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMA",
    "FedNova",
    "FedPart",
    "FedProx",
    "FedYogi",
    "LocalModels",
    "RoundPlan",
    "Scaffold",
    "ServerState",
    "StackedContext",
    "register",
]
