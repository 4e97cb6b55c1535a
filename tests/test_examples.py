"""The examples run as a user runs them."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_the_rl_loop_keeps_generation_equal_to_scoring_and_learns():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "rl_loop.py")],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    steps = re.findall(r"mean reward ([\d.]+), generation == scoring bit for bit: (\w+)",
                       r.stdout)
    assert len(steps) == 4 and all(same == "True" for _, same in steps)
    assert float(steps[-1][0]) > float(steps[0][0])
