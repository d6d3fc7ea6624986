"""streamavg against the read floor, per float dtype, on safetensors checkpoints.

    .venv/bin/python scripts/bench_dtypes.py --workdir bench-out/dtypes --n 10 --mb 266

For each dtype, N checkpoints of MB megabytes each (seeded random weights, one tensor per
16 MiB) are written once; then, alternating, the read floor (every input byte read once,
on one thread per core, from the page cache) and `python -m streamavg DIR -o OUT` (a fresh
process: imports, listing, the fold, the output written and fsynced), REPEATS times.
Prints the median wall time of each, their ratio, and streamavg's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TENSOR_BYTES = 16 << 20
CHILD = """
import runpy, sys
sys.argv = ["streamavg", *sys.argv[1:]]
try:
    runpy.run_module("streamavg", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def make(folder: Path, n: int, mb: int, dtype: str) -> None:
    """N checkpoints of `mb` MB of `dtype` in `folder`, unless already there."""
    import ml_dtypes
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    kind = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
    per = TENSOR_BYTES // kind.itemsize
    count = max(1, (mb << 20) // TENSOR_BYTES)
    for step in range(1, n + 1):
        path = folder / f"step_{step:03d}.safetensors"
        if path.exists():
            continue
        rng = np.random.default_rng(step)
        save_file(
            {
                f"layer.{k}.weight": rng.standard_normal(per, np.float32).astype(kind)
                for k in range(count)
            },
            path,
        )


def floor(files: list[Path]) -> float:
    """Seconds to read every byte of `files` once, one thread per core."""
    chunk = 8 << 20

    def read(path: Path) -> None:
        buf = bytearray(chunk)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(read, files))
    return time.perf_counter() - start


def streamavg(folder: Path, out: Path) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of a whole `python -m streamavg` run."""
    cmd = [sys.executable, "-c", CHILD, str(folder), "-o", str(out), "-q", "--overwrite"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as installed
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return time.perf_counter() - start, int(done.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("bench-out/dtypes"))
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--mb", type=int, default=266)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = p.parse_args()
    print(f"{'dtype':<9} {'floor':>8} {'streamavg':>10} {'ratio':>6} {'peak RSS':>9}")
    for dtype in args.dtypes.split(","):
        folder = args.workdir / dtype
        make(folder, args.n, args.mb, dtype)
        out = args.workdir / f"avg-{dtype}.safetensors"
        files = sorted(folder.glob("*.safetensors"))
        floor(files)  # into the page cache
        floors, runs, peaks = [], [], []
        for _ in range(args.repeats):
            floors.append(floor(files))
            seconds, peak = streamavg(folder, out)
            runs.append(seconds)
            peaks.append(peak)
        f, s = statistics.median(floors), statistics.median(runs)
        print(f"{dtype:<9} {f:7.2f}s {s:9.2f}s {s / f:5.2f}x {max(peaks) / 1024:6.0f} MiB")


if __name__ == "__main__":
    main()
