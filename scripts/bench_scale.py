"""The fold on a Dask cluster against a local run, on this machine: time, peak memory per
worker, per-task overhead and bytes per task, for the README's extrapolation.

Writes --n Keras 3 `.keras` checkpoints of about --mb MB (as scripts/bench.py does), then
times, median of --repeats, each in this process (which never imports Keras):

  local      streamavg.average(DIR, output=OUT): the threads of one process
  dask-K     the same with client=, on a scheduler and K worker processes (one thread
             each) started with the `dask` commands on loopback, restarted before each run
and the per-task overhead: a Dask round trip (200 tiny tasks on the cluster) plus opening
the inputs' metadata, which every task does before folding.

    .venv/bin/python scripts/bench_scale.py --workdir bench-out/scale --n 10 --mb 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import generate

import streamavg
from streamavg import cluster


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def dask_cluster(workers: int, workdir: Path):
    """A scheduler and `workers` worker processes (one thread each) on loopback, started
    with the `dask` commands, as on a real cluster: their memory is their own."""
    from distributed import Client

    info = workdir / "scheduler.json"
    info.unlink(missing_ok=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    dask = [sys.executable, "-m", "dask"]
    common = ["--scheduler-file", str(info)]
    processes = [
        subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                          "--no-dashboard", *common], **quiet),
        subprocess.Popen([*dask, "worker", "--host", "127.0.0.1", "--nworkers", str(workers),
                          "--nthreads", "1", "--no-dashboard", *common], **quiet),
    ]  # fmt: skip
    try:
        while not info.exists():
            time.sleep(0.1)
        with Client(scheduler_file=str(info)) as client:
            client.wait_for_workers(workers)
            yield client
    finally:
        for p in reversed(processes):
            p.terminate()
            p.wait()


def open_only(files: list[Path]) -> None:
    """What each task does before folding: open every input (metadata only)."""
    with ExitStack() as stack:
        streamavg.engine.open_all(files, stack)


def timed(run, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/scale"))
    parser.add_argument("--n", type=int, default=10, help="checkpoints")
    parser.add_argument("--mb", type=float, default=200, help="float32 weights per checkpoint")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ckpts = args.workdir / "ckpts"
    generate(ckpts, args.n, args.mb, "keras")
    out = args.workdir / "out.keras"
    files = sorted(ckpts.glob("model_*.keras"))[: args.n]
    with ExitStack() as stack:
        checkpoints = streamavg.engine.open_all(files, stack)
        tensors = streamavg.engine.to_average(checkpoints)
    per_checkpoint = sum(t.nbytes for t in tensors)

    def average(client=None):
        streamavg.average(files, output=out, overwrite=True, client=client)

    results = {"local": {"seconds": timed(average, args.repeats), "tasks": 0}}
    results["local"]["peak_rss_mib"] = peak_rss_mib()
    local_bytes = out.read_bytes()
    for k in args.workers:
        with dask_cluster(k, args.workdir) as client:
            tasks = len(cluster.groups(tensors, k))
            seconds = []
            for _ in range(args.repeats):
                client.restart()
                seconds += timed(lambda: average(client), 1)
            assert out.read_bytes() == local_bytes, "the cluster wrote other bytes"
            rss = client.run(peak_rss_mib)
            results[f"dask-{k}"] = {
                "seconds": seconds,
                "tasks": tasks,
                "peak_rss_mib_per_worker": sorted(rss.values()),
            }
            if k == 1:  # what a task costs beyond its folding: a round trip, and opening
                start = time.perf_counter()
                client.gather(client.map(len, [[i] for i in range(200)], pure=False))
                results["round_trip_s"] = (time.perf_counter() - start) / 200
    round_trip = results.pop("round_trip_s")
    opening = statistics.median(timed(lambda: open_only(files), args.repeats))
    overhead = round_trip + opening
    print(f"{args.n} checkpoints of {per_checkpoint / 1e6:.0f} MB ({len(tensors)} tensors), "
          f"{os.cpu_count()} CPUs; median of {args.repeats}\n")  # fmt: skip
    print("| run | wall | vs local | tasks | bytes per task (each checkpoint) | peak RSS |")
    print("|---|---|---|---|---|---|")
    local = statistics.median(results["local"]["seconds"])
    for name, res in results.items():
        wall = statistics.median(res["seconds"])
        per_task = per_checkpoint / res["tasks"] if res["tasks"] else per_checkpoint
        rss = res.get(
            "peak_rss_mib_per_worker", [res["peak_rss_mib"]] if "peak_rss_mib" in res else []
        )
        print(
            f"| {name} | {wall:.2f} s | {wall / local:.2f}x | {res['tasks'] or '-'} "
            f"| {per_task / 1e6:.1f} MB | {', '.join(f'{r:.0f} MiB' for r in rss) or '-'} |"
        )
    print(
        f"\nper-task overhead: {overhead * 1e3:.1f} ms = a Dask round trip "
        f"{round_trip * 1e3:.1f} ms + opening the {args.n} inputs {opening * 1e3:.1f} ms"
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([sys.executable, *sys.argv]), "results": results}
    record |= {"per_task_overhead_s": overhead, "bytes_per_checkpoint": per_checkpoint}
    (args.workdir / "scale.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
