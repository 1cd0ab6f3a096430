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


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (25x on a busy 2-core machine). Modules of
    tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
