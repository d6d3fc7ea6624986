"""Side-by-side benchmark: tutorial recipe vs. plain h5py read floor vs. streamavg.

Each measured command runs in its own subprocess; wall time and peak RSS come from os.wait4.
"""

import argparse
import json
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
IN_DIM, OUT_DIM, HIDDEN = 32, 10, 4
METHODS = ("tutorial", "read-floor", "streamavg")
# The floor reads what streamavg averages: every float tensor of the model part, once.
READ_FLOOR = """
import pathlib, sys
import h5py

def read(name, obj):
    if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
        obj[()]

for path in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(read)
"""


def mlp_width(mb: float) -> int:
    """Hidden width so that the MLP's float32 weights total about `mb` megabytes."""
    # params = (HIDDEN-1)*w^2 + (IN_DIM + HIDDEN + OUT_DIM)*w + OUT_DIM
    a, b, c = HIDDEN - 1, IN_DIM + HIDDEN + OUT_DIM, OUT_DIM - mb * 1e6 / 4
    return round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))


def generate(ckpts: Path, count: int, mb: float) -> None:
    """Ensure `count` checkpoints of about `mb` MB exist, writing them in a separate process."""
    meta_path = ckpts / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["mb"] == mb and meta["count"] >= count:
            return
    shutil.rmtree(ckpts, ignore_errors=True)
    ckpts.mkdir(parents=True)
    # Keras must not be imported here: a child's peak RSS includes the parent's RSS at spawn.
    proc = multiprocessing.get_context("spawn").Process(
        target=write_checkpoints, args=(ckpts, count, mb)
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"checkpoint generation failed (exit code {proc.exitcode})")
    meta_path.write_text(json.dumps({"mb": mb, "count": count, "width": mlp_width(mb)}))


def write_checkpoints(ckpts: Path, count: int, mb: float) -> None:
    """Write `count` perturbed full-model .h5 checkpoints that include optimizer state."""
    import keras
    import numpy as np

    width = mlp_width(mb)
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(HIDDEN)]
    model = keras.Sequential([keras.Input((IN_DIM,)), *layers, keras.layers.Dense(OUT_DIM)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, IN_DIM)).astype("float32")
    model.fit(x, rng.normal(size=(32, OUT_DIM)).astype("float32"), verbose=0)
    for epoch in range(1, count + 1):
        model.set_weights(
            [w + rng.normal(0, 1e-3, w.shape).astype(w.dtype) for w in model.get_weights()]
        )
        model.save(ckpts / f"model_{epoch:03d}.h5")
        print(f"generated {ckpts / f'model_{epoch:03d}.h5'}", file=sys.stderr)


def link_newest(ckpts: Path, target: Path, n: int) -> None:
    """Fill `target` with symlinks to the newest `n` checkpoints."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in sorted(ckpts.glob("model_*.h5"))[-n:]:
        (target / path.name).symlink_to(path.resolve())


def warm_cache(directory: Path) -> None:
    """Read every file once so that timings start from a warm page cache."""
    for path in directory.iterdir():
        with path.open("rb") as f:
            while f.read(1 << 20):
                pass


def measure(cmd: list[str]) -> dict:
    """Run `cmd`; return wall time, peak RSS (MiB), exit code and, on failure, stderr tail."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
    # ru_maxrss is in KiB on Linux.
    run = {"wall_s": wall, "rss_mib": usage.ru_maxrss / 1024, "rc": proc.returncode}
    return {**run, "stderr": tail} if proc.returncode else run


def commands(directory: Path, out: Path, scheme: str) -> dict[str, list[str]]:
    """The three measured command lines for one checkpoint directory."""
    py, d, o, flags = sys.executable, str(directory), str(out), ["--scheme", scheme]
    return {
        "tutorial": [py, str(SCRIPTS / "tutorial_method.py"), d, o, *flags],
        "read-floor": [py, "-c", READ_FLOOR, d],
        "streamavg": [py, "-m", "streamavg", d, *flags, "-o", o, "--overwrite", "--quiet"],
    }


def ratio(num: dict | None, den: dict | None, key: str) -> str:
    """Format num/den for `key`, or n/a when either side is missing."""
    if not num or not den:
        return "n/a"
    return f"{num[key] / den[key]:.2f}x"


def report(results: dict[int, dict[str, dict]]) -> str:
    """Markdown tables of medians and ratios."""
    lines = ["| N | method | median wall s | median peak RSS MiB |", "|---|---|---|---|"]
    for n, by_method in results.items():
        for method, res in by_method.items():
            if res["ok"]:
                lines.append(f"| {n} | {method} | {res['wall_s']:.2f} | {res['rss_mib']:.0f} |")
            else:
                lines.append(f"| {n} | {method} | failed | failed |")
    lines += [
        "",
        "| N | RSS tutorial/streamavg | time tutorial/streamavg | time streamavg/read-floor |",
        "|---|---|---|---|",
    ]
    for n, by_method in results.items():
        tut, floor, sa = (by_method[m] if by_method[m]["ok"] else None for m in METHODS)
        lines.append(
            f"| {n} | {ratio(tut, sa, 'rss_mib')} | {ratio(tut, sa, 'wall_s')} "
            f"| {ratio(sa, floor, 'wall_s')} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse options, generate checkpoints, run all measurements and report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", default="5,20", help="comma-separated checkpoint counts")
    parser.add_argument("--mb", type=float, default=38, help="float32 weight MB per model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--scheme", default="linear", choices=["equal", "linear", "exp"])
    args = parser.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}\n", flush=True)

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # inherited by every subprocess
    counts = [int(n) for n in args.n.split(",")]
    ckpts = args.workdir / "ckpts"
    generate(ckpts, max(counts), args.mb)
    out_dir = args.workdir / "out"
    out_dir.mkdir(exist_ok=True)

    results: dict[int, dict[str, dict]] = {}
    for n in counts:
        directory = args.workdir / f"n{n}"
        link_newest(ckpts, directory, n)
        warm_cache(directory)
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for _ in range(args.repeats):
            for method, cmd in commands(directory, out_dir / "avg.h5", args.scheme).items():
                if runs[method] and runs[method][-1]["rc"] != 0:
                    continue  # already failed for this N; do not retry
                shutil.rmtree(out_dir)
                out_dir.mkdir()
                run = measure(cmd)
                runs[method].append(run)
                if run["rc"] != 0:
                    tail = "\n    ".join(run["stderr"])
                    print(f"FAILED N={n} {method} (rc={run['rc']}):\n    {tail}", file=sys.stderr)
        results[n] = {}
        for method, method_runs in runs.items():
            ok = all(r["rc"] == 0 for r in method_runs)
            results[n][method] = {
                "ok": ok,
                "wall_s": statistics.median(r["wall_s"] for r in method_runs) if ok else None,
                "rss_mib": statistics.median(r["rss_mib"] for r in method_runs) if ok else None,
                "runs": method_runs,
            }
    shutil.rmtree(out_dir)

    print(report(results))
    meta = {"command": command, "mb": args.mb, "scheme": args.scheme, "cpus": os.cpu_count()}
    (args.workdir / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
