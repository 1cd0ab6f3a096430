"""fedsim: federated-learning simulation on Ray.

Algorithms (FedAvg, FedProx, FedMA, PFNM, FedPart, MOON) run on one engine that owns the
round loop; every run writes Parquet tables (runs, rounds, clients) with exact bytes.
"""

__version__ = "0.1.0"
