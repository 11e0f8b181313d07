"""Fault campaign (issue 8): a real `serve` is killed, starved or cut off from its broker, catalog or
object store while instances arrive; after recovery every instance that got Success must be archived
exactly once, rebuild its original bytes, and WADO-RS must never have served other bytes.

`make test` runs each scenario once with a fixed seed.  FAULT_RUNS=N runs N seeds per scenario
(FAULT_SEED sets the first); with FAULT_REPORT_DIR (or FUZZ_REPORT_DIR, as `make soak` sets) each
run's outcome is appended to <dir>/faults.jsonl.  Helpers and the scenarios: faults.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability.faults import SCENARIOS

FIXED_SEED = 20260806
RUNS = int(os.environ.get("FAULT_RUNS", "1"))
FIRST = int(os.environ.get("FAULT_SEED", str(FIXED_SEED)))
SEEDS = [FIRST + i for i in range(RUNS)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_scenario(name: str, seed: int, tmp_path: Path) -> None:
    outcome = SCENARIOS[name](seed, tmp_path)
    print(outcome.summary())
    failures = outcome.failures()
    assert not failures, f"{name} seed {seed}: " + "; ".join(failures[:10]) + f"\n{outcome.summary()}"
    assert outcome.sent and outcome.archived == outcome.sent, outcome.summary()
