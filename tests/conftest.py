"""Shared fixtures: one small local Ray instance per test session, and tiny experiment configs."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and no dashboard, shared by every test that needs Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def tiny_experiment(**over):
    """A raw experiment dict: digits, 6 clients, 3 per round, 2 short rounds, sequential backend."""
    raw = {
        "name": "tiny",
        "seed": 3,
        "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "num_clients": 6},
        "model": {"name": "digits_cnn"},
        "engine": {"backend": "sequential", "clients_per_round": 3},
        "runs": [{"algorithm": "fedavg", "rounds": 2, "local_epochs": 1, "lr": 0.05, "batch_size": 32}],
    }
    for k, v in over.items():
        raw[k] = v
    return raw
