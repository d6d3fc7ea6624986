"""Training-step cost of weight averaging: no EMA vs. Keras's use_ema vs. streamavg's EMA callback.

Each method trains the same MLP on the same random data in its own subprocess (the parent imports
neither Keras nor TensorFlow), so peak RSS from os.wait4 is per method. The first epoch is
discarded as tracing/warm-up; per-step time is the median (and best) of the remaining epochs.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("plain", "keras-ema", "streamavg-ema")
RATIOS = (("keras-ema", "plain"), ("streamavg-ema", "plain"), ("streamavg-ema", "keras-ema"))
DECAY = 0.999


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def device(backend: str) -> str:
    """The accelerator the backend uses ("cuda: <name>", "gpu: <name>") or the CPU model."""
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name()}"
    elif backend == "jax":
        import jax

        if jax.default_backend() != "cpu":
            return f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
    else:
        import tensorflow as tf

        if gpus := tf.config.list_physical_devices("GPU"):
            return f"gpu: {tf.config.experimental.get_device_details(gpus[0]).get('device_name')}"
    return f"cpu: {cpu_model()}"


def child(args: argparse.Namespace) -> dict:
    """Train with one method; return per-step times in ms (run inside the subprocess)."""
    callbacks = []
    if args.child == "streamavg-ema":
        try:
            from streamavg.callbacks import EMA
        except ImportError as exc:
            return {"unavailable": f"{type(exc).__name__}: {exc}"}
        callbacks.append(EMA(decay=DECAY, validate="raw"))
    import keras
    import numpy as np

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds.append(time.perf_counter() - self.start)

    seconds: list[float] = []
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = args.inputs or args.width
    x = rng.normal(size=(args.steps * args.batch_size, inputs)).astype("float32")
    y = rng.integers(0, 10, size=len(x)).astype("int32")
    hidden = [keras.layers.Dense(args.width, activation="relu") for _ in range(args.depth)]
    model = keras.Sequential([keras.Input((inputs,)), *hidden, keras.layers.Dense(10)])
    ema = {"use_ema": args.child == "keras-ema", "ema_momentum": DECAY}
    if args.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, **ema)
    else:
        optimizer = keras.optimizers.AdamW(learning_rate=1e-3, **ema)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = EpochTimer()
    fit = {"batch_size": args.batch_size, "epochs": args.epochs, "shuffle": False, "verbose": 0}
    fit_s = []
    for _ in range(args.fits):
        start = time.perf_counter()
        model.fit(x, y, callbacks=[*callbacks, timer], **fit)
        fit_s.append(time.perf_counter() - start)
    step_ms = [s * 1e3 / args.steps for s in seconds[1:]]
    return {
        "step_ms": statistics.median(step_ms),
        "best_ms": min(step_ms),
        "fit_s": statistics.median(fit_s[1:] or fit_s),  # the first fit traces: left out
        "epoch_s": seconds,
        "params": model.count_params(),
        "device": device(keras.backend.backend()),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run a child; return its JSON result plus peak RSS (MiB), exit code and any stderr tail."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        lines = [ln for ln in out.read().decode(errors="replace").splitlines() if ln[:1] == "{"]
        tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
    # ru_maxrss is in KiB on Linux.
    run = {"rc": rc, "rss_mib": usage.ru_maxrss / 1024}
    if rc or not lines:
        return {**run, "rc": rc or 1, "stderr": tail}
    return {**run, **json.loads(lines[-1])}


def summarize(runs: list[dict]) -> dict:
    """Medians over repeats, or the reason the method has no numbers."""
    if "unavailable" in runs[-1]:
        return {"status": "unavailable: " + runs[-1]["unavailable"], "runs": runs}
    if any(r["rc"] for r in runs):
        return {"status": "failed", "runs": runs}
    keys = ("step_ms", "best_ms", "fit_s", "rss_mib")
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    return {"status": "ok", **medians, "runs": runs}


def report(results: dict[str, dict]) -> str:
    """Markdown table of medians, then the step-time ratios."""
    lines = [
        "| method | median step ms | best step ms | median fit s | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for method, res in results.items():
        if res["status"] == "ok":
            cells = (
                f"{res['step_ms']:.3f} | {res['best_ms']:.3f} | {res['fit_s']:.3f} "
                f"| {res['rss_mib']:.0f}"
            )
        else:
            cells = f"{res['status']} | | | "
        lines.append(f"| {method} | {cells} |")
    lines.append("")
    for num, den in RATIOS:
        a, b = results[num], results[den]
        ok = a["status"] == b["status"] == "ok"
        if ok:
            ratios = f"step {a['step_ms'] / b['step_ms']:.3f}x, fit {a['fit_s'] / b['fit_s']:.3f}x"
        lines.append(f"{num}/{den}: " + (ratios if ok else "n/a"))
    return "\n".join(lines)


def main() -> None:
    """Parse options, run every method `--repeats` times interleaved, report and save."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="tensorflow", choices=["tensorflow", "torch", "jax"])
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--steps", type=int, default=200, help="batches per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="per fit; the first one is discarded")
    parser.add_argument(
        "--fits", type=int, default=1, help="fits in a row; the first one's time is discarded"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024, help="hidden width")
    parser.add_argument("--inputs", type=int, help="input width (default: --width)")
    parser.add_argument("--depth", type=int, default=3, help="hidden Dense layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/ema.json"))
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs * args.fits < 2:
        parser.error("--epochs times --fits must be at least 2 (the first epoch is discarded)")
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return

    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}\n", flush=True)
    env = {**os.environ, "KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    child_args = {k: v for k, v in vars(args).items() if k not in ("child", "out", "repeats")}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in child_args.items() if v is not None]
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            if runs[method] and (runs[method][-1]["rc"] or "unavailable" in runs[method][-1]):
                continue  # failed or unavailable once: do not retry
            run = measure([sys.executable, __file__, "--child", method, *flags], env)
            runs[method].append(run)
            if "unavailable" in run:
                print(f"skipping {method}: {run['unavailable']}", file=sys.stderr)
            elif run["rc"]:
                tail = "\n    ".join(run["stderr"])
                print(f"FAILED {method} (rc={run['rc']}):\n    {tail}", file=sys.stderr)
    results = {method: summarize(method_runs) for method, method_runs in runs.items()}

    devices = {r["device"] for rs in runs.values() for r in rs if "device" in r}
    params = {r["params"] for rs in runs.values() for r in rs if "params" in r}
    print(f"backend: {args.backend}, device: {', '.join(sorted(devices)) or 'unknown'}", end="")
    print(f", parameters: {', '.join(f'{p:,}' for p in sorted(params))}\n")
    print(report(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "devices": sorted(devices), "cpus": os.cpu_count()}
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    args.out.write_text(json.dumps({**meta, **settings, "results": results}, indent=2))


if __name__ == "__main__":
    main()
