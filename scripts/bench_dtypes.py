"""streamavg against the read floor, per float dtype, on safetensors checkpoints, with what
else any exact averaging pays beside the reads.

    .venv/bin/python scripts/bench_dtypes.py --workdir bench-out/dtypes --n 10 --mb 266

For each dtype, N checkpoints of MB megabytes each (seeded random weights, one tensor per
16 MiB) are written once; then, alternating, REPEATS times:
- read floor: every input byte read once, on one thread per core, from the page cache;
- sums floor: the float64 sums alone (each input element widened exactly and added), on
  values already in memory, one thread per core: numpy's arithmetic, no reading;
- write floor: one checkpoint's bytes written and fsynced (the output);
- start-up: a fresh `python` importing streamavg and numpy;
- `python -m streamavg DIR -o OUT`: a fresh process (imports, listing, the fold, the
  output written and fsynced).
Prints the median wall time of each, streamavg's ratio to the read floor, its peak RSS.
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

from streamavg.casts import named_dtype, widen

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
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    kind = named_dtype(dtype)
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


def sums_floor(dtype: str, elements: int) -> float:
    """Seconds to widen and add `elements` values of `dtype` into float64 sums of 2 MiB,
    one thread per core, the values already in memory."""
    piece = 1 << 18
    raw = np.ones(piece, named_dtype(dtype)).view(f"u{named_dtype(dtype).itemsize}")

    def fold(count: int) -> None:
        acc, scratch = np.zeros(piece), np.empty(piece, np.float32)
        for _ in range(count):
            np.add(acc, widen(raw, dtype, scratch), out=acc, dtype=np.float64)

    workers = os.cpu_count() or 1
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fold, [elements // piece // workers] * workers))
    return time.perf_counter() - start


def write_floor(path: Path, size: int) -> float:
    """Seconds to write `size` bytes to `path` and fsync them (then removed)."""
    block = np.ones(8 << 20, np.uint8)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for at in range(0, size, block.size):
            f.write(block[: size - at].data)
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def child_env() -> dict[str, str]:
    """This environment, with bytecode cached, as an installed package has it."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def start_up() -> float:
    """Seconds for a fresh interpreter to import what a run imports before its work."""
    start = time.perf_counter()
    cmd = [sys.executable, "-c", "import numpy, streamavg.api, streamavg.cli"]
    subprocess.run(cmd, check=True, env=child_env())
    return time.perf_counter() - start


def streamavg(folder: Path, out: Path) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of a whole `python -m streamavg` run."""
    cmd = [sys.executable, "-c", CHILD, str(folder), "-o", str(out), "-q", "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=child_env())
    return time.perf_counter() - start, int(done.stdout.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("bench-out/dtypes"))
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--mb", type=int, default=266)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    args = p.parse_args()
    print(
        "| dtype | read floor | sums floor | write floor | start-up | streamavg | x read floor "
        "| peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for dtype in args.dtypes.split(","):
        folder = args.workdir / dtype
        make(folder, args.n, args.mb, dtype)
        out = args.workdir / f"avg-{dtype}.safetensors"
        files = sorted(folder.glob("*.safetensors"))
        elements = sum(f.stat().st_size for f in files) // named_dtype(dtype).itemsize
        floor(files)  # into the page cache
        times: dict[str, list[float]] = {}
        peaks = []
        for _ in range(args.repeats):
            seconds, peak = streamavg(folder, out)
            peaks.append(peak)
            for name, value in (
                ("read", floor(files)),
                ("sums", sums_floor(dtype, elements)),
                ("write", write_floor(args.workdir / "write-floor", files[0].stat().st_size)),
                ("start", start_up()),
                ("streamavg", seconds),
            ):
                times.setdefault(name, []).append(value)
        m = {name: statistics.median(values) for name, values in times.items()}
        cells = " | ".join(f"{m[k]:.2f} s" for k in ("read", "sums", "write", "start", "streamavg"))
        ratio = m["streamavg"] / m["read"]
        print(f"| {dtype} | {cells} | {ratio:.2f}x | {max(peaks) / 1024:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
