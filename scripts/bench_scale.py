"""The fold on a Dask cluster against a local run, on this machine, from local files and
from an S3 server on loopback: time, peak memory per worker, per-task overhead and bytes
per task, for the README's extrapolation.

Writes --n Keras 3 `.keras` checkpoints of about --mb MB (as scripts/bench.py does),
uploads them to moto's S3 server (started here, in its own process, on 127.0.0.1), then
times, median of --repeats, for each source of inputs (local files, then S3), and S3
inputs to an S3 output on workers that share no disk with this process (root only):

  local      streamavg.average(INPUTS, output=OUT): the threads of one process; peak
             RSS from a run of `python -m streamavg`, which reports its own
  dask-K     streamavg.average(INPUTS, client=) from this process, on a scheduler and K
             worker processes (one thread each) started with the `dask` commands on
             loopback, restarted before each run; each worker's peak RSS
  floor      reading every byte of the inputs once: `cat` of the files (page cache), or
             s3fs fetching them in 8 MiB ranges, all at once
and the per-task overhead: a Dask round trip (200 tiny tasks on the cluster) plus opening
the inputs' metadata, which every task does before folding.

    .venv/bin/python scripts/bench_scale.py --workdir bench-out/scale --n 10 --mb 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import generate
from distributed import get_task_stream

import streamavg
from streamavg import cluster


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def dask_cluster(workers: int, workdir: Path, hide: Path | None = None):
    """A scheduler and `workers` worker processes (one thread each) on loopback, started
    with the `dask` commands, as on a real cluster: their memory is their own. With `hide`,
    the workers run in a mount namespace of their own with an empty tmpfs over that
    folder (root only): they share no disk with this process."""
    from distributed import Client

    info = Path(tempfile.mkdtemp(prefix="streamavg-dask-")) / "scheduler.json"  # not hidden
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    dask = [sys.executable, "-m", "dask"]
    common = ["--scheduler-file", str(info)]
    loopback = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]  # no 0.0.0.0
    processes = [
        subprocess.Popen([*dask, "scheduler", *loopback, "--port", "0", *common], **quiet),
        subprocess.Popen([*apart(hide), *dask, "worker", *loopback, "--nworkers", str(workers),
                          "--nthreads", "1", *common], cwd="/", **quiet),
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
        shutil.rmtree(info.parent, ignore_errors=True)


def apart(hide: Path | None) -> list[str]:
    """The command prefix that runs a command with an empty tmpfs over `hide`."""
    if hide is None:
        return []
    script = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hide)]


@contextmanager
def s3_server():
    """moto's S3 server in its own process on loopback, with a bucket `bench`; the
    environment (inherited by the workers started after) points at it."""
    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], **quiet)  # fmt: skip
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    try:
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.1)
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        yield fs
    finally:
        server.terminate()
        server.wait()


def cli(inputs: list[str], out: Path) -> float:
    """The peak RSS in MiB that `python -m streamavg` reports for itself (its VmHWM: a
    forked child's ru_maxrss would count this process's too)."""
    command = [sys.executable, "-m", "streamavg", *inputs, "-o", str(out), "--overwrite", "-q"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(re.search(r"peak memory (\d+) MB", done.stdout)[1]) * 1e6 / 2**20


def floor(fs, inputs: list[str]) -> None:
    """Every byte of the inputs read once: from the page cache, or from S3 in 8 MiB ranges."""
    if fs is None:
        buffer = bytearray(8 << 20)
        for f in inputs:
            with open(f, "rb", buffering=0) as raw:
                while raw.readinto(buffer):
                    pass
        return
    chunk = 8 << 20
    ranges = [
        (f, a, min(a + chunk, fs.size(f))) for f in inputs for a in range(0, fs.size(f), chunk)
    ]
    fs.cat_ranges(*map(list, zip(*ranges, strict=True)))


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

    results: dict[str, dict] = {}
    with s3_server() as fs:
        urls = []
        for f in files:
            fs.put_file(str(f), f"bench/ckpts/{f.name}")
            urls.append(f"s3://bench/ckpts/{f.name}")
        for source, inputs in (("local", [str(f) for f in files]), ("s3", urls)):
            alone = timed(
                lambda inputs=inputs: streamavg.average(inputs, output=out, overwrite=True),
                args.repeats,
            )  # in this process, as the Dask runs are driven: no interpreter start
            results[source] = {"seconds": alone, "tasks": 0, "peak_rss_mib": cli(inputs, out)}
            reference = out.read_bytes()
            for k in args.workers:
                with dask_cluster(k, args.workdir) as client:
                    seconds = []
                    for _ in range(args.repeats):
                        client.restart()
                        seconds += timed(
                            lambda inputs=inputs, client=client: streamavg.average(
                                inputs, output=out, overwrite=True, client=client
                            ),
                            1,
                        )
                    assert out.read_bytes() == reference, "the cluster wrote other bytes"
                    rss = client.run(peak_rss_mib)
                    results[f"{source} dask-{k}"] = {
                        "seconds": seconds,
                        "tasks": len(cluster.groups(tensors, k)),
                        "peak_rss_mib_per_worker": sorted(rss.values()),
                    }
                    if k == 1 and source == "local":  # a task's cost beyond folding: a round trip
                        start = time.perf_counter()
                        client.gather(client.map(len, [[i] for i in range(200)], pure=False))
                        results["round_trip_s"] = (time.perf_counter() - start) / 200
            results[f"{source} floor"] = {
                "seconds": timed(
                    lambda store=fs if source == "s3" else None, inputs=inputs: floor(
                        store, inputs
                    ),
                    args.repeats,
                ),
                "tasks": 0,
            }
        s3_out = "s3://bench/out/avg.keras"
        for k in args.workers:  # S3 to S3, workers that share no disk with this process
            with dask_cluster(k, args.workdir, hide=args.workdir.resolve()) as client:
                seconds, cpu = [], []
                for _ in range(args.repeats):
                    client.restart()
                    before = resource.getrusage(resource.RUSAGE_SELF)
                    with get_task_stream(client) as stream:
                        seconds += timed(
                            lambda client=client: streamavg.average(
                                urls, output=s3_out, overwrite=True, client=client
                            ),
                            1,
                        )
                    after = resource.getrusage(resource.RUSAGE_SELF)
                    cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                assert fs.cat("bench/out/avg.keras") == reference, "the workers sent other bytes"
                etag = fs.info("bench/out/avg.keras")["ETag"].strip('"')
                results[f"s3 to s3 dask-{k} apart"] = {
                    "seconds": seconds,
                    "tasks": sum("streamavg-fold" in str(t["key"]) for t in stream.data),
                    "parts": int(etag.split("-")[1]) if "-" in etag else 1,
                    "client_cpu_s": cpu,
                    "peak_rss_mib_per_worker": sorted(client.run(peak_rss_mib).values()),
                }
    round_trip = results.pop("round_trip_s")
    opening = statistics.median(timed(lambda: open_only(files), args.repeats))
    overhead = round_trip + opening
    print(f"{args.n} checkpoints of {per_checkpoint / 1e6:.0f} MB ({len(tensors)} tensors), "
          f"{os.cpu_count()} CPUs; median of {args.repeats}\n")  # fmt: skip
    print("| run | wall | vs local | vs its read floor | tasks "
          "| bytes per task (each checkpoint) | peak RSS |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    local = statistics.median(results["local"]["seconds"])
    for name, res in results.items():
        wall = statistics.median(res["seconds"])
        source = "s3" if name.startswith("s3") else "local"
        read = statistics.median(results[f"{source} floor"]["seconds"])
        per_task = per_checkpoint / res["tasks"] if res["tasks"] else per_checkpoint
        rss = res.get(
            "peak_rss_mib_per_worker", [res["peak_rss_mib"]] if "peak_rss_mib" in res else []
        )
        print(
            f"| {name} | {wall:.2f} s | {wall / local:.2f}x | {wall / read:.2f}x "
            f"| {res['tasks'] or '-'} "
            f"| {per_task / 1e6:.1f} MB | {', '.join(f'{r:.0f} MiB' for r in rss) or '-'} |"
        )
    for name, res in results.items():
        if "parts" in res:
            print(
                f"\n{name}: {res['parts']} parts of the output sent by the workers; the client "
                f"used {statistics.median(res['client_cpu_s']):.2f} s of CPU a run"
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
