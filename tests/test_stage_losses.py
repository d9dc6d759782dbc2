"""Behaviour is preserved: the per-step losses of a tiny run of every stage kind (ZeRO-3, 1 and 2 processes) are
bitwise the values stored in tests/data/stage_losses.json (see tests/stage_losses.py for how they were recorded)."""

import json
from pathlib import Path

from tests.stage_losses import record

STORED = Path(__file__).parent / "data" / "stage_losses.json"


def test_per_step_losses_are_bitwise_the_stored_ones(tmp_path):
    expected = json.loads(STORED.read_text())
    measured = json.loads(json.dumps(record(tmp_path)))
    assert sorted(measured) == sorted(expected)
    for world, runs in expected.items():
        assert sorted(measured[world]) == sorted(runs), world
        for name, steps in runs.items():
            assert len(steps) > 0, (world, name)
            assert measured[world][name] == steps, f"{world} {name}: {measured[world][name]} != {steps}"
