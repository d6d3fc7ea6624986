"""Benchmark averaging Keras checkpoints: the tutorial recipe, an h5py read floor, streamavg.

For every grid point (N checkpoints of about MB megabytes each) this measures, side by side,
the wall time (median of --repeats runs) and peak RSS (os.wait4) of each method as a whole
process:

  tutorial           scripts/tutorial_method.py: load_model every checkpoint, np.average,
                     clone_model + set_weights, save; skipped where it would not fit in memory
  read-floor         h5py reading every float tensor of the model part of every file once,
                     into reused buffers: the reading any averaging has to do
  write-floor        writing and fsyncing as many bytes as the newest checkpoint holds: what
                     any tool pays to put its output safely on disk, however it computes it
                     (then dropped from the page cache, as streamavg drops its output)
  streamavg          python -m streamavg DIR --scheme S -o OUT --overwrite --quiet
  streamavg-bounded  the same with --max-memory 256M

The checkpoints are Keras 3 MLPs of the requested size, compiled with plain SGD and fitted
on one batch, each the previous one plus small Gaussian noise. A spawned process writes
them (Keras is never imported here: a child's peak RSS would include this process's), and
they are kept under WORKDIR/ckpts for later runs. Before each point, every set is evicted
from the page cache and the point's own files are read once, when they fit in memory; before
each run, os.sync() finishes any write-back left by the run before. Two grids: N in --n at
--mb MB, and MB in --sizes at N = --size-n; --compare-h5 adds N = 20 at --mb MB in both
formats. Results go to WORKDIR/results.json and WORKDIR/report.md (also printed), with four
PNG plots.

Full grid (many minutes, about 30 GB of disk):
    .venv/bin/python scripts/bench.py --compare-h5 --docs docs
Quick check:
    .venv/bin/python scripts/bench.py --workdir /tmp/bench-tiny --mb 1 --n 2,3 --sizes 1,2 \
        --size-n 2 --repeats 2

scripts/bench_formats.py measures the same way across containers (.keras, .weights.h5,
unzipped .keras folders, sharded .weights.json, .safetensors and Hugging Face sharded
folders, Orbax where it is installed) and for ResNet50's many small tensors, against a floor
that reads exactly the averaged tensors' bytes at offsets found beforehand.
"""

import argparse
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
IN_DIM, OUT_DIM, HIDDEN = 32, 10, 4
METHODS = ("tutorial", "read-floor", "write-floor", "streamavg", "streamavg-bounded")
FORMATS = ("keras", "h5")
MAX_MEMORY = "256M"  # streamavg-bounded's --max-memory
COMPARE_N = 20  # checkpoints at the --compare-h5 point
GIB = 1 << 30
# The floor reads what streamavg averages: every float tensor of the model part of every file,
# once, in filename order, into one reused buffer. A .keras archive's model.weights.h5 is read
# in place through a window onto the zip member; the optimizer group is not the model part.
READ_FLOOR = """
import io, os, struct, sys, zipfile
from pathlib import Path

import h5py
import numpy as np

buffer = np.empty(0, np.uint8)


class Member(io.RawIOBase):
    \"\"\"Read-only file object over `size` bytes at `start` of the file `path`.\"\"\"

    def __init__(self, path, start, size):
        self.fd, self.start, self.size, self.pos = os.open(path, os.O_RDONLY), start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = (0, self.pos, self.size)[whence] + offset
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, buf):
        # h5py zero-fills what a read leaves short, so read all of it (one preadv stops at 2 GiB).
        view, done = memoryview(buf).cast("B")[: max(0, self.size - self.pos)], 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], self.start + self.pos + done)
            if not n:
                break
            done += n
        self.pos += done
        return done

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def keras_weights(path):
    \"\"\"The stored model.weights.h5 member of a .keras archive, never extracted.\"\"\"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    assert info.compress_type == zipfile.ZIP_STORED, f"{path}: model.weights.h5 is compressed"
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return Member(path, info.header_offset + 30 + name_len + extra_len, info.compress_size)


def read(obj):
    \"\"\"Read a float dataset into the reused buffer, growing it when needed.\"\"\"
    global buffer
    if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and obj.size:
        if obj.nbytes > buffer.nbytes:
            buffer = np.empty(obj.nbytes, np.uint8)
        obj.read_direct(buffer[: obj.nbytes].view(obj.dtype).reshape(obj.shape))


def read_tree(group, skip=""):
    \"\"\"Read every float dataset under `group` except those under its member `skip`.\"\"\"
    group.visititems(lambda name, obj: None if name.split("/")[0] == skip else read(obj))


for path in sorted(Path(sys.argv[1]).iterdir()):
    if path.suffix == ".keras":
        with keras_weights(path) as member, h5py.File(member, "r") as f:
            read_tree(f, skip="optimizer")
    else:
        with h5py.File(path, "r") as f:
            read_tree(f["model_weights"])
"""


# The durable write of an output as large as the newest checkpoint, in 1 MiB writes, then
# dropped from the page cache (as streamavg drops its output) so the inputs stay cached.
WRITE_FLOOR = """
import os, sys
size, block = int(sys.argv[2]), bytes(1 << 20)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for start in range(0, size, len(block)):
    os.write(fd, block[: size - start])
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
"""


@dataclass(frozen=True)
class Point:
    """One grid point: `n` checkpoints of about `mb` MB each, saved as `fmt`."""

    n: int
    mb: float
    fmt: str

    def __str__(self) -> str:
        return f"N={self.n} x {self.mb:g} MB .{self.fmt}"


def mlp_width(mb: float) -> int:
    """Hidden width so that the MLP's float32 weights total about `mb` megabytes."""
    # params = (HIDDEN-1)*w^2 + (IN_DIM + HIDDEN + OUT_DIM)*w + OUT_DIM
    a, b, c = HIDDEN - 1, IN_DIM + HIDDEN + OUT_DIM, OUT_DIM - mb * 1e6 / 4
    return round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))


def meminfo(key: str) -> int:
    """A /proc/meminfo entry (MemTotal, MemAvailable, ...) in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name == key:
            return int(value.split()[0]) * 1024
    raise KeyError(key)


def generate(ckpts: Path, count: int, mb: float, fmt: str) -> None:
    """Ensure `count` checkpoints of about `mb` MB exist, writing them in a spawned process."""
    meta = {"mb": mb, "count": count, "format": fmt, "width": mlp_width(mb)}
    meta_path = ckpts / "meta.json"
    if meta_path.exists():
        cached = json.loads(meta_path.read_text())
        if cached["count"] >= count and {**cached, "count": count} == meta:
            return
    shutil.rmtree(ckpts, ignore_errors=True)
    ckpts.mkdir(parents=True)
    # Keras must not be imported here: a child's peak RSS includes the parent's RSS at spawn.
    proc = multiprocessing.get_context("spawn").Process(
        target=write_checkpoints, args=(ckpts, count, mb, fmt)
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        sys.exit(f"checkpoint generation failed (exit code {proc.exitcode})")
    meta_path.write_text(json.dumps(meta))


def write_checkpoints(ckpts: Path, count: int, mb: float, fmt: str) -> None:
    """Write `count` perturbed Keras 3 checkpoints (`.keras` or legacy `.h5`) with SGD state."""
    import keras
    import numpy as np

    logging.getLogger("absl").setLevel(logging.ERROR)  # legacy .h5 warns on every save
    width = mlp_width(mb)
    layers = [keras.layers.Dense(width, activation="relu") for _ in range(HIDDEN)]
    model = keras.Sequential([keras.Input((IN_DIM,)), *layers, keras.layers.Dense(OUT_DIM)])
    model.compile(optimizer="sgd", loss="mse")  # plain SGD: its state is a few scalars
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, IN_DIM)).astype("float32")
    model.fit(x, rng.normal(size=(32, OUT_DIM)).astype("float32"), batch_size=32, verbose=0)
    for epoch in range(1, count + 1):
        model.set_weights(
            [w + 1e-3 * rng.standard_normal(w.shape, np.float32) for w in model.get_weights()]
        )
        path = ckpts / f"model_{epoch:03d}.{fmt}"
        model.save(path)
        print(f"generated {path}", file=sys.stderr, flush=True)


def link_newest(ckpts: Path, target: Path, n: int, fmt: str) -> None:
    """Fill `target` with symlinks to the newest `n` checkpoints."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in sorted(ckpts.glob(f"model_*.{fmt}"))[-n:]:
        (target / path.name).symlink_to(path.resolve())


def evict(ckpts: Path) -> None:
    """Drop every generated checkpoint from the page cache, so that no earlier point's files
    crowd out this point's (no privileges needed: posix_fadvise)."""
    for path in ckpts.rglob("model_*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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
    """The measured command line of every method for one checkpoint directory."""
    py, d, o, flags = sys.executable, str(directory), str(out), ["--scheme", scheme]
    inputs = list(directory.iterdir())
    streamavg = [py, "-m", "streamavg", d, *flags, "-o", o, "--overwrite", "--quiet"]
    return {
        "tutorial": [py, str(SCRIPTS / "tutorial_method.py"), d, o, *flags],
        "read-floor": [py, "-c", READ_FLOOR, d],
        "write-floor": [py, "-c", WRITE_FLOOR, o, str(max(p.stat().st_size for p in inputs))],
        "streamavg": streamavg,
        "streamavg-bounded": [*streamavg, "--max-memory", MAX_MEMORY],
    }


def tutorial_skip_reason(point: Point) -> str | None:
    """Why the tutorial method would not fit in available memory at `point`, or None."""
    need = point.n * point.mb * 1e6 * 3 + GIB
    available = meminfo("MemAvailable")
    if need <= available:
        return None
    return (
        f"needs about {need / GIB:.1f} GiB (N x model x 3 + 1 GiB), "
        f"{available / GIB:.1f} GiB available"
    )


def summarize(runs: list[dict]) -> dict:
    """Medians of a method's runs, or ok=False when any of them failed."""
    ok = all(r["rc"] == 0 for r in runs)
    median = {
        k: statistics.median(r[k] for r in runs) if ok else None for k in ("wall_s", "rss_mib")
    }
    return {"ok": ok, **median, "runs": runs}


def run_methods(
    cmds: dict[str, list[str]], runs: dict[str, list[dict]], repeats: int, out_dir: Path
) -> None:
    """Run each method of `runs` `repeats` times, interleaved, each into an empty `out_dir`
    after os.sync(); a method that fails once is not run again."""
    for _ in range(repeats):
        for method, method_runs in runs.items():
            if method_runs and method_runs[-1]["rc"] != 0:
                continue  # already failed at this point; do not retry
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir()
            os.sync()  # no write-back left over from the previous run competes with this one
            run = measure(cmds[method])
            method_runs.append(run)
            if run["rc"] != 0:
                tail = "\n    ".join(run["stderr"])
                print(f"  FAILED {method} (rc={run['rc']}):\n    {tail}", file=sys.stderr)
    shutil.rmtree(out_dir, ignore_errors=True)


def measure_point(
    point: Point, grids: list[str], ckpts: Path, workdir: Path, scheme: str, repeats: int
) -> dict:
    """Link the point's checkpoints, warm the cache if it fits, and run every method."""
    directory = workdir / "runs" / f"{point.fmt}-{point.mb:g}mb-n{point.n}"
    link_newest(ckpts, directory, point.n, point.fmt)
    evict(ckpts.parent)
    set_bytes = sum(p.stat().st_size for p in directory.iterdir())
    cache = "warm" if set_bytes + GIB <= meminfo("MemAvailable") else "cold/partial cache"
    if cache == "warm":
        warm_cache(directory)
    print(f"{point}: {set_bytes / 1e6:.0f} MB on disk, {cache}", file=sys.stderr, flush=True)

    skipped = {"tutorial": tutorial_skip_reason(point)}
    out_dir = workdir / "out"
    cmds = commands(directory, out_dir / f"avg.{point.fmt}", scheme)
    runs: dict[str, list[dict]] = {m: [] for m in cmds if not skipped.get(m)}
    for method, reason in skipped.items():
        if reason:
            print(f"  skipped {method}: {reason}", file=sys.stderr)
    run_methods(cmds, runs, repeats, out_dir)

    methods = {
        m: summarize(runs[m]) if m in runs else {"ok": False, "skipped": skipped[m]} for m in cmds
    }
    for method, res in methods.items():
        wall, rss, note = describe(res)
        print(f"  {method}: {wall} s, {rss} MiB {note}".rstrip(), file=sys.stderr, flush=True)
    return {
        "grids": grids,
        "n": point.n,
        "mb": point.mb,
        "format": point.fmt,
        "set_bytes": set_bytes,
        "cache": cache,
        "methods": methods,
    }


def grid_points(args: argparse.Namespace) -> dict[Point, list[str]]:
    """Every point to measure, once each, with the names of the grids it belongs to."""
    points: dict[Point, list[str]] = {}
    if args.grid in ("n", "both"):
        for n in args.n:
            points.setdefault(Point(n, args.mb, args.format), []).append("n")
    if args.grid in ("size", "both"):
        for mb in args.sizes:
            points.setdefault(Point(args.size_n, mb, args.format), []).append("size")
    if args.compare_h5:
        for fmt in FORMATS:
            points.setdefault(Point(COMPARE_N, args.mb, fmt), []).append("compare")
    return points


def ok(result: dict, method: str) -> dict | None:
    """The method's result at a point if it has medians, else None."""
    res = result["methods"][method]
    return res if res["ok"] else None


def ratio(num: dict | None, den: dict | None, key: str) -> str:
    """Format num/den for `key`, or n/a when either side is missing."""
    if not num or not den:
        return "n/a"
    return f"{num[key] / den[key]:.2f}x"


def describe(res: dict) -> tuple[str, str, str]:
    """Wall, RSS and note cells for one method's result at one point."""
    if res["ok"]:
        return f"{res['wall_s']:.2f}", f"{res['rss_mib']:.0f}", ""
    if "skipped" in res:
        return "skipped", "skipped", res["skipped"]
    return "failed", "failed", f"rc={res['runs'][-1]['rc']}"


def report(header: str, results: list[dict]) -> str:
    """Markdown: medians per point and method, ratios per point, .keras vs .h5."""
    key = "| grids | N | MB | format |"
    lines = [header, "", f"{key} method | median wall s | median peak RSS MiB | note |"]
    lines.append("|---" * 8 + "|")
    for r in results:
        cells = f"| {','.join(r['grids'])} | {r['n']} | {r['mb']:g} | {r['format']} |"
        for method, res in r["methods"].items():
            lines.append(f"{cells} {method} | {' | '.join(describe(res))} |")

    lines += [
        "",
        f"{key} cache | RSS tutorial/streamavg | time tutorial/streamavg "
        "| time streamavg/read-floor | time bounded/read-floor "
        "| time streamavg/(read+write floors) | RSS N/RSS N_min |",
    ]
    lines.append("|---" * 11 + "|")
    n_grid = [r for r in results if "n" in r["grids"]]
    base = ok(min(n_grid, key=lambda r: r["n"]), "streamavg") if n_grid else None
    for r in results:
        tut, floor, write, sa, bounded = (ok(r, m) for m in METHODS)
        flat = ratio(sa, base, "rss_mib") if "n" in r["grids"] else ""
        both = {"wall_s": floor["wall_s"] + write["wall_s"]} if floor and write else None
        lines.append(
            f"| {','.join(r['grids'])} | {r['n']} | {r['mb']:g} | {r['format']} | {r['cache']} "
            f"| {ratio(tut, sa, 'rss_mib')} | {ratio(tut, sa, 'wall_s')} "
            f"| {ratio(sa, floor, 'wall_s')} | {ratio(bounded, floor, 'wall_s')} "
            f"| {ratio(sa, both, 'wall_s')} | {flat} |"
        )

    compare = {r["format"]: r for r in results if "compare" in r["grids"]}
    if len(compare) == len(FORMATS):
        keras, h5 = compare["keras"], compare["h5"]
        lines += ["", f"N={COMPARE_N} x {keras['mb']:g} MB, .keras vs .h5:", ""]
        lines += ["| method | time keras/h5 | RSS keras/h5 |", "|---|---|---|"]
        for m in METHODS:
            pair = ok(keras, m), ok(h5, m)
            lines.append(f"| {m} | {ratio(*pair, 'wall_s')} | {ratio(*pair, 'rss_mib')} |")
    return "\n".join(lines)


def plot(results: list[dict], workdir: Path) -> list[Path]:
    """RSS and time against N (N grid) and against MB (size grid); return the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    written = []
    for grid, x_key, x_label in (("n", "n", "checkpoints N"), ("size", "mb", "MB per checkpoint")):
        points = sorted((r for r in results if grid in r["grids"]), key=lambda r: r[x_key])
        if not points:
            continue
        first = points[0]
        title = (
            f"{first['mb']:g} MB .{first['format']} checkpoints"
            if grid == "n"
            else f"N = {first['n']} .{first['format']} checkpoints"
        )
        for y_key, name, y_label in (
            ("rss_mib", "rss", "peak RSS, MiB"),
            ("wall_s", "time", "wall time, s"),
        ):
            fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
            for method, marker in zip(METHODS, "osd^x", strict=True):
                xy = [(r[x_key], res[y_key]) for r in points if (res := ok(r, method))]
                if xy:
                    ax.plot(*zip(*xy, strict=True), marker=marker, label=method)
            ax.set(xscale="log", yscale="log", xlabel=x_label, ylabel=y_label, title=title)
            ax.set_xticks([r[x_key] for r in points])
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_locator(NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            fig.tight_layout()
            path = workdir / f"{name}_vs_{grid}.png"
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


def number_list(kind: type) -> Callable[[str], list]:
    """An argparse type for comma-separated numbers of `kind`."""
    return lambda text: [kind(x) for x in text.split(",")]


def main() -> None:
    """Parse options, generate checkpoints, measure every grid point, report and plot."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n",
        type=number_list(int),
        default=[5, 20, 100],
        help="checkpoint counts of the N grid (default 5,20,100)",
    )
    parser.add_argument("--mb", type=float, default=38, help="MB per checkpoint of the N grid")
    parser.add_argument(
        "--sizes",
        type=number_list(float),
        default=[38, 400, 2000],
        help="MB per checkpoint of the size grid (default 38,400,2000)",
    )
    parser.add_argument("--size-n", type=int, default=10, help="checkpoints in the size grid")
    parser.add_argument("--grid", choices=["n", "size", "both"], default="both")
    parser.add_argument("--format", choices=FORMATS, default="keras", help="checkpoint format")
    parser.add_argument(
        "--compare-h5",
        action="store_true",
        help=f"also measure N={COMPARE_N} at --mb MB as .keras and as .h5",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scheme", default="linear", choices=["equal", "linear", "exp"])
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--docs", type=Path, help="also copy the PNG plots to this directory")
    args = parser.parse_args()
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}", file=sys.stderr, flush=True)

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # inherited by every subprocess
    # Byte-compile streamavg as a regular install does (an editable one, or a shell with
    # PYTHONDONTWRITEBYTECODE set, would otherwise compile it again in every run).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(SCRIPTS.parent / "streamavg")], check=True
    )
    points = grid_points(args)
    counts: dict[tuple[float, str], int] = {}
    for p in points:
        counts[p.mb, p.fmt] = max(counts.get((p.mb, p.fmt), 0), p.n)
    sets = {(mb, fmt): args.workdir / "ckpts" / f"{fmt}-{mb:g}mb" for mb, fmt in counts}
    for (mb, fmt), count in counts.items():
        generate(sets[mb, fmt], count, mb, fmt)

    results = [
        measure_point(p, grids, sets[p.mb, p.fmt], args.workdir, args.scheme, args.repeats)
        for p, grids in points.items()
    ]
    info = {
        "command": command,
        "cpus": os.cpu_count(),
        "mem_total_mib": meminfo("MemTotal") // 2**20,
        "format": args.format,
        "scheme": args.scheme,
        "repeats": args.repeats,
        "max_memory": MAX_MEMORY,
    }
    (args.workdir / "results.json").write_text(json.dumps({**info, "points": results}, indent=2))
    header = (
        f"`{command}`: {info['cpus']} CPUs, {info['mem_total_mib']} MiB memory, "
        f"scheme {args.scheme}, median of {args.repeats} runs"
    )
    text = report(header, results)
    (args.workdir / "report.md").write_text(text + "\n")
    print(text)

    for path in plot(results, args.workdir):
        if args.docs:
            args.docs.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, args.docs / path.name)


if __name__ == "__main__":
    main()
