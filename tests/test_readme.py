"""The README's callbacks example runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_the_callbacks_example_runs(tmp_path, capsys):
    section = README.read_text().split("## During training")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, str(README), "exec"), {})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "'val_ema_accuracy', 'val_ema_loss', 'val_loss'" in printed
    # The state file and the backup go once fit completes; the averaged weights stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.weights.h5"]
