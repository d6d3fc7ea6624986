"""streamavg beside the read floor and the tools users would otherwise run, on the same files.

    .venv/bin/python scripts/bench_peers.py --workdir bench-out/peers --n 5,10 --repeats 3

Peers, each a whole process reading the same safetensors, writing safetensors, all weights
equal: fairseq's average_checkpoints.py loop (sums in the stored dtype, float16 as float32,
then div_; reproduced over safetensors.torch.load_file, fairseq does not install on current
Python), timm's avg_checkpoints.py loop (float64 sums over timm.models.load_state_dict,
written float32 after a clamp; the script ships in neither timm's wheel nor its sdist) and
mergekit's linear merge (mergekit-yaml). They need torch, timm (so torchvision, which
imports only beside PyPI's torch of its release, not a CPU wheel) and mergekit: installed
once into WORKDIR/venv. streamavg runs on this interpreter. Cases: a LlamaForCausalLM
(about 134 M parameters; --small: a few MB) written by save_pretrained in 3 shards, per dtype
at each N, and timm's resnet50 (--small: test_resnet) as single float32 files at N=10; each
checkpoint the same random weights plus seeded noise, written once. Per case, alternating
REPEATS times: the read floor (every input byte once, one thread per core, page cache warm)
and each tool. Prints per case the median wall time, its ratio to the floor and to
streamavg, peak RSS (each child's own VmHWM), the max ulp against the float64 mean rounded
to the stored dtype (in ulps at that mean: huge where the inputs cancel and the sums are
not float64), and whether every tensor keeps its stored dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_dtypes import floor  # every input byte read once, one thread per core

PEAK = """
import atexit, runpy, sys
def report():  # this process's own high-water mark: rusage would count the parent's
    status = open("/proc/self/status").read()
    print("peak RSS KiB", status.split("VmHWM:")[1].split()[0], flush=True)
atexit.register(report)
target, *sys.argv = sys.argv[1:]
if target == "-m":
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv.insert(0, target)
    runpy.run_path(target, run_name="__main__")
"""
PACKAGES = ["torch", "torchvision", "safetensors", "timm", "transformers", "mergekit>=0.1,<0.2"]
GENERATE = """
import copy, sys
from pathlib import Path
import torch
kind, folder, n, dtype, small = sys.argv[1:]
dtype = getattr(torch, dtype)
torch.manual_seed(0)
if kind == "llama":
    from huggingface_hub import split_torch_state_dict_into_shards as split
    from transformers import LlamaConfig, LlamaForCausalLM
    size = (64, 256, 2, 4, 4096) if small == "1" else (768, 2048, 12, 12, 32000)
    keys = "hidden_size intermediate_size num_hidden_layers num_attention_heads vocab_size"
    base = LlamaForCausalLM(LlamaConfig(**dict(zip(keys.split(), size))))
    state = {k: v.to(dtype) for k, v in base.state_dict().items()}
    total = sum(t.nbytes for t in state.values())
    shard = next(total * k // 300 for k in range(100, 300)
                 if len(split(state, max_shard_size=total * k // 300).filename_to_tensors) == 3)
else:
    import timm
    from safetensors.torch import save_file
    base = timm.create_model("test_resnet" if small == "1" else "resnet50")
for step in range(1, int(n) + 1):
    model, gen = copy.deepcopy(base), torch.Generator().manual_seed(step)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen), alpha=1e-3)
    model.to(dtype)
    if kind == "llama":
        model.save_pretrained(Path(folder, f"checkpoint-{step}"), max_shard_size=shard)
    else:
        save_file(model.state_dict(), Path(folder, f"step_{step}.safetensors"))
"""
LOOP = """
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
*inputs, out = sys.argv[1:]
def files(path):
    return sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [path]
"""
FAIRSEQ = (
    LOOP
    + """
sums = {}
for path in inputs:
    state = {k: v for f in files(path) for k, v in load_file(f).items()}
    for k, p in state.items():
        if isinstance(p, torch.HalfTensor):
            p = p.float()
        if k not in sums:
            sums[k] = p.clone()
        else:
            sums[k] += p
for v in sums.values():
    v.div_(len(inputs))
save_file(sums, out)
"""
)
TIMM = (
    LOOP
    + """
from timm.models import load_state_dict
sums, counts = {}, {}
for path in inputs:
    state = {k: v for f in files(path) for k, v in load_state_dict(str(f)).items()}
    for k, v in state.items():
        if k not in sums:
            sums[k], counts[k] = v.clone().to(dtype=torch.float64), 1
        else:
            sums[k] += v.to(dtype=torch.float64)
            counts[k] += 1
for k, v in sums.items():
    v.div_(counts[k])
info = torch.finfo(torch.float32)
save_file({k: v.clamp(info.min, info.max).to(dtype=torch.float32) for k, v in sums.items()}, out)
"""
)


def run(cmd: list, cwd: Path, log: Path) -> tuple[float, int]:
    """Seconds and peak RSS (KiB, as PEAK prints it) of one whole child process; raises
    with its log's last line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with open(log, "w") as f:
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    lines = log.read_text().strip().splitlines() or [""]
    peaks = [int(line.split()[-1]) for line in lines if line.startswith("peak RSS KiB")]
    if code.returncode:
        raise RuntimeError([line for line in lines if not line.startswith("peak RSS")][-1])
    return seconds, peaks[-1] if peaks else 0


def peak(python: Path | str, *target: object) -> list:
    """Run `target` (a script, or "-m" and a module) under `python` through PEAK."""
    return [python, "-c", PEAK, *target]


def environment(work: Path) -> Path:
    """The peers' interpreter, in WORK/venv, installed once."""
    python = work / "venv" / "bin" / "python"
    if not (work / "venv" / "ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", work / "venv"], check=True)
        print("installing the peers into", work / "venv", "(once; PyPI's torch is several GB)")
        run([python, "-m", "pip", "install", "-q", *PACKAGES], work, work / "pip.log")
        (work / "venv" / "ready").touch()
    return python


def make(python: Path, work: Path, kind: str, dtype: str, n: int, small: bool) -> list[Path]:
    """The `n` checkpoints of `kind` in `dtype`, written unless already there."""
    folder = work / "data" / f"{kind}-{dtype}{'-small' if small else ''}"
    done = folder / "done"
    if not done.exists() or int(done.read_text()) < n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        script = work / "generate.py"
        script.write_text(GENERATE)
        args = [kind, folder, str(n), dtype, str(int(small))]
        run([python, script, *args], work, work / "generate.log")
        done.write_text(str(n))
    name = "checkpoint-{}" if kind == "llama" else "step_{}.safetensors"
    return [folder / name.format(step) for step in range(1, n + 1)]


def shards(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint or output: the file, or those in the folder."""
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def max_ulp(inputs: list[Path], output: Path) -> tuple[float, bool]:
    """Largest error in ulps of the stored dtype against the float64 mean, and dtypes kept."""
    import ml_dtypes  # noqa: F401  (numpy learns bfloat16)
    from safetensors import safe_open

    def opened(path: Path) -> dict:
        handles = [safe_open(f, "np") for f in shards(path)]
        return {name: h for h in handles for name in h.keys()}  # noqa: SIM118

    sources, out = [opened(p) for p in inputs], opened(output)
    if set(out) != set(sources[0]):
        raise RuntimeError(f"tensor names differ: {sorted(set(out) ^ set(sources[0]))[:3]}")
    worst, kept = 0.0, True
    for name, handle in sources[0].items():
        first, got = handle.get_tensor(name), out[name].get_tensor(name)
        kept &= got.dtype == first.dtype
        if first.dtype.kind != "f" and first.dtype.name != "bfloat16":
            continue
        mean = first.astype(np.float64)
        for source in sources[1:]:
            mean += source[name].get_tensor(name).astype(np.float64)
        ref = (mean / len(sources)).astype(first.dtype)
        err = np.abs(got.astype(np.float64).astype(first.dtype).astype(np.float64) - ref)
        worst = max(worst, float(np.max(err / np.abs(np.spacing(ref)).astype(np.float64))))
    return worst, kept


def output(work: Path, tool: str, hf: bool) -> Path:
    """Where `tool` writes: a Hugging Face folder for streamavg and mergekit, else a file."""
    folder = hf and tool in ("streamavg", "mergekit")
    return work / "out" / tool / ("avg" if folder else "avg.safetensors")


def tools(python: Path, work: Path, inputs: list[Path], dtype: str, hf: bool) -> dict:
    """Each tool's command line, less the output path; None where it does not apply."""
    for name, code in (("fairseq", FAIRSEQ), ("timm", TIMM)):
        (work / f"{name}_avg.py").write_text(code)
    if hf:
        config = {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in inputs],
            "dtype": dtype,
            "out_dtype": dtype,
        }
        (work / "mergekit.yml").write_text(json.dumps(config, indent=1))  # YAML reads JSON
    mergekit = [python.parent / "mergekit-yaml", work / "mergekit.yml", "--no-copy-tokenizer"]
    return {
        "streamavg": peak(sys.executable, "-m", "streamavg", *inputs, "-q", "--overwrite", "-o"),
        "fairseq": peak(python, work / "fairseq_avg.py", *inputs),
        "timm": peak(python, work / "timm_avg.py", *inputs),
        "mergekit": peak(python, *mergekit, "--quiet") if hf else None,
    }


def bench(python: Path, work: Path, inputs: list[Path], dtype: str, hf: bool, repeats: int):
    """Print one case's table: floor and every tool, alternating, REPEATS times each."""
    files = [f for p in inputs for f in shards(p)]
    commands = tools(python, work, inputs, dtype, hf)
    floor(files)  # into the page cache
    floors, times, peaks, failed = [], {t: [] for t in commands}, {t: 0 for t in commands}, {}
    for _ in range(repeats):
        floors.append(floor(files))
        for tool, command in commands.items():
            if command is None or tool in failed:
                continue
            out = work / "out" / tool
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            try:
                seconds, peak = run([*command, output(work, tool, hf)], work, out / "log")
            except RuntimeError as e:
                if tool == "streamavg":
                    raise
                failed[tool] = f"fails: {e}"
                continue
            times[tool].append(seconds)
            peaks[tool] = max(peaks[tool], peak)
    f, base = statistics.median(floors), statistics.median(times["streamavg"])
    print("| tool | wall (s) | x floor | x streamavg | peak RSS (MiB) | max ulp | keeps dtype |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| read floor | {f:.2f} | 1.00 | {f / base:.2f} | | | |")
    for tool, command in commands.items():
        if command is None or tool in failed:
            print(f"| {tool} | {failed.get(tool, 'n/a')} | | | | | |")
            continue
        s = statistics.median(times[tool])
        ulp, kept = max_ulp(inputs, output(work, tool, hf))
        print(
            f"| {tool} | {s:.2f} | {s / f:.2f} | {s / base:.2f} | {peaks[tool] / 1024:.0f} "
            f"| {ulp:.4g} | {'yes' if kept else 'no'} |"
        )
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("bench-out/peers"))
    p.add_argument("--n", default="5,10", help="checkpoints a Llama case averages")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--cases", default="llama,resnet50")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true", help="tiny models, for a quick try")
    args = p.parse_args()
    print("   ", shlex.join([sys.executable, *sys.argv]), "\n")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = environment(work)
    counts = [int(n) for n in args.n.split(",")]
    for case in args.cases.split(","):
        llama = case == "llama"
        for dtype in args.dtypes.split(",") if llama else ["float32"]:
            checkpoints = make(python, work, case, dtype, max(counts) if llama else 10, args.small)
            for n in counts if llama else [10]:
                print(f"### {case}, {dtype}, N={n}\n")
                bench(python, work, checkpoints[:n], dtype, llama, args.repeats)


if __name__ == "__main__":
    main()
