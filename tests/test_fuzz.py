"""Seeded mutations of real checkpoints: no traceback, crash or hang, and no wrong answer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py"


def test_damaged_checkpoints_are_refused_or_averaged_exactly(checkpoints):
    """300 cases in a child process, so that a crash or a hang fails this test too."""
    cmd = [sys.executable, str(FUZZ), "--checkpoints", str(checkpoints), "--cases", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tally = {word: int(n) for n, word in re.findall(r"(\d+) (refused|accepted)", proc.stdout)}
    assert set(tally) == {"refused", "accepted"}  # both outcomes are exercised
    assert tally["refused"] + tally["accepted"] == 300
