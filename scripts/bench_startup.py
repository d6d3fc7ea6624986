"""How long the command line takes to answer `-V` and `-h`, against the interpreter alone
and against importing numpy, each a fresh process, median of REPEATS (alternating).

    .venv/bin/python scripts/bench_startup.py --repeats 21

The command line imports numpy, h5py and the rest only when a command runs
(tests/test_cli.py::test_help_and_version_import_nothing_heavy checks which modules load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = str(Path(sys.executable).parent / "streamavg")
COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
    "streamavg -V": [SCRIPT, "-V"],
    "streamavg -h": [SCRIPT, "-h"],
    "python -m streamavg -V": [sys.executable, "-m", "streamavg", "-V"],
}


def wall(command: list[str]) -> float:
    """Seconds from start to exit of `command`, byte-code cache in use as a user's would be."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    for command in COMMANDS.values():  # warm: byte code compiled, files in the page cache
        wall(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(wall(command))
    floor = statistics.median(times["python -c pass (floor)"])
    print("| command | median | x interpreter alone |\n|---|---:|---:|")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"| `{name}` | {median * 1000:.0f} ms | {median / floor:.1f}x |")


if __name__ == "__main__":
    main()
