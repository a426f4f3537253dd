"""The fusion example runs end to end on the packaged MiniLM and data, in its quick mode."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fusion_tasks.py"


def test_fusion_example_quick_run():
    run = subprocess.run([sys.executable, str(EXAMPLE), "--quick", "--seeds", "0"], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    scores = dict(re.findall(r"\| (\w[\w ]+ on \w+) \| ([0-9.]+) ± ", run.stdout))
    assert set(scores) == {"sentiment adapter on sentiment", "topic adapter on topic", "fusion on sentiment"}
    assert all(0.0 <= float(value) <= 1.0 for value in scores.values())
    assert "Fusion " in run.stdout
