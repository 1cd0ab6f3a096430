"""Every experiment file in jobs/ parses strictly (unknown keys or values would fail here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim import config

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_job_file_is_a_valid_experiment(path):
    cfg = config.load(path)
    assert cfg.runs and all(r.label for r in cfg.runs)
