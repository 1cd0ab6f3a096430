"""Shared fixtures: one small local Ray instance per test session. Shared helpers: tests/helpers.py."""

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
