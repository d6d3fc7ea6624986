"""The command line: `streamavg PATH... [options]`, `streamavg inspect FILE`, `streamavg sweep`,
`streamavg phema`."""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

from ._version import __version__
from .choices import COMPANION_POLICIES, INTEGER_POLICIES, MODES, OPTIMIZER_POLICIES, SCHEMES
from .errors import StreamavgError, UsageError, command_line

if TYPE_CHECKING:
    from .api import Plan, Result
    from .synthesis import Recipe

# The commands import numpy and the rest when they run, so that -h and -V answer at once.

USAGE = """\
streamavg [options] PATH...              average checkpoints into one
       streamavg inspect FILE                   list a checkpoint's tensors
       streamavg sweep PATH... --data NPZ       score the average of the last n, or a soup
       streamavg phema DIR --sigma-rel S        an EMA of any length from PostHocEMA snapshots
       streamavg -h | -V                        help, version"""

DESCRIPTION = """\
Average checkpoints (.keras, .weights.h5, .weights.json, legacy .h5, Orbax, safetensors,
and folders as their loaders take them: KerasHub presets, Hugging Face, PEFT) into one of
their own format, with constant memory.
Checkpoints are ordered by the epoch number in their names and weighed alike (equal,
the default), or the newest most (--scheme linear or exp).
Run `streamavg inspect FILE` to list a checkpoint's tensors, and `streamavg sweep` to
score the average of the last n checkpoints for every n (or a greedy soup)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage plus error
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="streamavg",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="PATH", help="checkpoint files or directories")
    _add_selection(p)
    wts = _add_scheme(p)
    wts.add_argument(
        "--weights",
        metavar="W1,W2,...",
        type=_floats,
        help="explicit weights, oldest first (overrides --scheme)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where to write (default: DIR/averaged/NEWEST.avg-SCHEME-nN.EXT)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace an existing output")
    out.add_argument(
        "--optimizer",
        choices=OPTIMIZER_POLICIES,
        default="drop",
        help="drop optimizer state, or keep the newest checkpoint's (default: drop)",
    )
    out.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="average NaN and Inf instead of refusing them",
    )
    _add_integers(out)
    out.add_argument(
        "--companions",
        choices=COMPANION_POLICIES,
        default="equal",
        help="the files that give the weights their meaning (model config, vocabulary, "
        "tokenizer) must be the same in every checkpoint; or take the newest's, with a note "
        "(default: equal)",
    )
    out.add_argument(
        "--max-memory",
        metavar="SIZE",
        type=_size,
        help="cap the working buffers, e.g. 64M or 1G (default: a few MiB per core, fastest); "
        "memory never grows with the model's size or the number of checkpoints",
    )
    out.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="fold on this Dask scheduler's workers (tcp://HOST:PORT), which read the inputs "
        "and write the output themselves: paths must be the same on every worker",
    )
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar or weight table")
    out.add_argument(
        "--json",
        action="store_true",
        help="print the run as one JSON object (inputs and their weights, output, bytes, "
        "seconds, peak memory, notes) instead of the table, notes and summary",
    )
    out.add_argument(
        "--dry-run",
        action="store_true",
        help="print the selection, its weights and the output path, then stop: "
        "no weights read, nothing written",
    )
    p.add_argument("-V", "--version", action="version", version=f"streamavg {__version__}")
    return p


def _add_selection(p: argparse.ArgumentParser) -> None:
    """The selection options (sweep's --mode also gives its --metric's direction)."""
    sel = p.add_argument_group(
        "selection",
        "Checkpoints are ordered by the epoch (and batch) numbers in their names, never\n"
        "by metric values such as 0.53; filters apply in the order --epochs, --best, --last.",
    )
    sel.add_argument(
        "--pattern",
        metavar="GLOB",
        help="checkpoints to take from directories (default: *.keras, *.h5, *.hdf5, "
        "*.weights.json, *.safetensors and checkpoint folders, or those one level down if "
        "there are none)",
    )
    sel.add_argument(
        "--template",
        metavar="FILEPATH",
        help="the ModelCheckpoint filepath that named the files, such as "
        "'ckpt.{epoch:02d}-{val_loss:.2f}.keras': order by its {epoch} and {batch}, take "
        "metric values from its fields, leave out names it does not match",
    )
    sel.add_argument(
        "--epochs", metavar="FIRST:LAST", help="keep epochs FIRST to LAST inclusive, e.g. 490:499"
    )
    sel.add_argument(
        "--best",
        type=int,
        metavar="K",
        help="keep the K checkpoints best by --monitor (still weighed oldest to newest)",
    )
    sel.add_argument(
        "--monitor", metavar="NAME", help="the logged metric --best ranks by, e.g. val_loss"
    )
    sel.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="whether lower (min) or higher (max) --monitor (and sweep's --metric) is better "
        "(default auto: as Keras's callbacks infer it)",
    )
    sel.add_argument(
        "--log",
        metavar="CSV",
        help="a keras.callbacks.CSVLogger file with --monitor for every epoch "
        "(default: the --template's field)",
    )
    sel.add_argument("--last", type=int, metavar="N", help="keep only the newest N checkpoints")


def _add_integers(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--integers",
        choices=INTEGER_POLICIES,
        default="equal",
        help="integer weights (counters, quantized kernels) cannot be averaged: require them "
        "equal in every checkpoint, or take each layer whose integers differ whole from the "
        "newest checkpoint, float weights (a quantized kernel's scale) too (default: equal)",
    )


def _selection(args: argparse.Namespace, **given: str) -> dict:
    """The keyword arguments of `plan` that choose and order the checkpoints."""
    names = ("pattern", "template", "epochs", "best", "monitor", "mode", "log", "last")
    return {name: getattr(args, name) for name in names} | given


def _print_notes(p: Plan | Result) -> None:
    for note in p.notes:
        print(f"streamavg: note: {one_line(note)}", file=sys.stderr)


def one_line(text: str) -> str:
    """`text` with control characters escaped (`\\n`), so that a file or tensor named with
    a newline cannot split a message or forge another."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _add_scheme(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    wts = p.add_argument_group("weights")
    wts.add_argument(
        "--scheme",
        choices=SCHEMES,
        default="equal",
        help="equal: 1/n each; linear: n/n..1/n; exp: exp(-i/alpha) (default: equal)",
    )
    wts.add_argument("--alpha", type=float, default=2.0, help="decay of --scheme exp (default 2)")
    return wts


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    """A byte count such as 256M or 1GiB (binary units)."""
    match = re.fullmatch(r"(\d+(?:\.\d*)?)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size such as 256M or 1G: {text!r}")
    try:
        return int(float(match[1]) * UNITS[match[2].upper()])
    except OverflowError:
        raise argparse.ArgumentTypeError(f"too large: {text!r}") from None


def _table(p: Plan) -> str:
    rows = [f"{'#':>3}  {'weight':>8}  file"]
    rows += [
        f"{i:>3}  {w:8.6f}  {f}" for i, (f, w) in enumerate(zip(p.files, p.weights, strict=True), 1)
    ]
    return "\n".join(rows)


def _average(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    from .api import check_options, plan, run
    from .cluster import dask_client, distributed_client
    from .output import resolve
    from .select import count

    quiet = args.quiet or args.json
    p = plan(
        args.inputs, scheme=args.scheme, alpha=args.alpha, weights=args.weights, **_selection(args)
    )
    if not args.json:
        _print_notes(p)
    if not quiet:
        print(_table(p))
    if args.dry_run:  # every check the run makes before its work
        check_options(optimizer=args.optimizer, max_memory=args.max_memory)
        if args.scheduler:
            distributed_client()
        dest = resolve(args.output, p.format, p.files, p.scheme, overwrite=args.overwrite)
        if args.json:
            print(_json(p, p.notes, dest, None, started))
        else:
            print(f"dry run: would average {count(len(p.files), 'file')} ({p.scheme}) into {dest}")
        return 0
    with dask_client(args.scheduler) if args.scheduler else nullcontext() as client:
        result = run(
            p,
            args.output,
            optimizer=args.optimizer,
            overwrite=args.overwrite,
            allow_nonfinite=args.allow_nonfinite,
            integers=args.integers,
            companions=args.companions,
            max_memory=args.max_memory,
            progress=not quiet,
            client=client,
        )
    if args.json:
        print(_json(p, p.notes + result.notes, result.output, _written(result.output), started))
        return 0
    _print_notes(result)
    print(
        f"averaged {count(len(p.files), 'file')} ({p.scheme}) into {result.output} "
        f"in {time.perf_counter() - started:.2f} s, peak memory {_peak_rss_kib() / 1024:.0f} MB"
    )
    return 0


def _json(
    p: Plan, notes: Sequence[str], output: object, written: int | None, started: float
) -> str:
    """The run as one JSON object, for scripts: `written` is None for a dry run."""
    return json.dumps(
        {
            "inputs": [
                {"path": str(f), "weight": w} for f, w in zip(p.files, p.weights, strict=True)
            ],
            "scheme": p.scheme,
            "format": p.format,
            "output": str(output),
            "dry_run": written is None,
            "bytes": written,
            "seconds": round(time.perf_counter() - started, 3),
            "peak_memory": _peak_rss_kib() * 1024,
            "notes": list(notes),
        }
    )


def _written(output: object) -> int:
    """The bytes of the checkpoint at `output`: its weights files and the files with them."""
    from .formats import open_checkpoint

    with open_checkpoint(output) as ck:
        return ck.size + sum(c.size for c in ck.companions())


def _peak_rss_kib() -> int:
    """This process's peak RSS; /proc's VmHWM, unlike ru_maxrss, forgets the parent we forked."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def inspect(path: str) -> str:
    """A readable listing of a checkpoint: format, tensors, shapes, dtypes and sizes."""
    from .formats import open_checkpoint
    from .select import count

    with open_checkpoint(path, optimizer=True) as ck:
        total = sum(t.nbytes for t in ck.tensors.values())
        lines = [
            f"{ck.path}: {ck.format}, {count(len(ck.tensors), 'tensor')}, {total:,} bytes "
            f"({ck.size:,} bytes on disk)"
        ]
        if ck.folder:
            lines.append(f"weights files: {', '.join(ck.files)}")
            shared = [c.name for c in ck.companions() if c.role != "state"]
            if shared:
                lines.append(f"with them: {', '.join(shared)}")
        if ck.provenance is not None:
            lines.append(f"averaged by streamavg: {ck.provenance}")
        width = max([len(n) for n in ck.tensors] + [6])
        lines.append(
            f"{'part':<9}  {'tensor':<{width}}  {'shape':<16}  {'dtype':<8}  {'bytes':>12}"
        )
        for t in ck.tensors.values():
            lines.append(
                f"{t.part:<9}  {t.name:<{width}}  {t.shape!s:<16}  {t.logical:<8}  {t.nbytes:>12,}"
            )
        for part in ("model", "optimizer", "other"):
            ts = [t for t in ck.tensors.values() if t.part == part]
            if ts:
                lines.append(
                    f"{part}: {count(len(ts), 'tensor')}, {sum(t.nbytes for t in ts):,} bytes"
                )
    return "\n".join(lines)


def _inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="streamavg inspect", description="List a checkpoint's tensors.")
    p.add_argument("file", metavar="FILE")
    return p


def _inspect(argv: Sequence[str]) -> int:
    print(inspect(_inspect_parser().parse_args(argv).file))
    return 0


def _sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="streamavg sweep",
        description="Score the average of the last n checkpoints for every n in one pass over "
        "the files, or build a greedy soup (--greedy). Needs Keras, and .keras or full-model "
        ".h5 checkpoints.",
    )
    p.add_argument("inputs", nargs="+", metavar="PATH", help="checkpoint files or directories")
    p.add_argument("--data", required=True, metavar="NPZ", help="held-out arrays x and y")
    p.add_argument("--metric", help="a compiled metric (default: accuracy if there, else loss)")
    p.add_argument("--greedy", action="store_true", help="greedy soup (Wortsman et al., 2022)")
    _add_selection(p)
    _add_scheme(p)
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", metavar="PATH", help="write the best average or soup here")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_integers(out)
    return p


def _sweep(argv: Sequence[str]) -> int:
    args = _sweep_parser().parse_args(argv)
    from .api import plan, run
    from .output import resolve

    if args.greedy and args.scheme != "equal":
        raise UsageError("--greedy averages its soup equally; it takes no --scheme")
    ranking = {"mode": args.mode if args.best else "auto"}  # --mode is the --metric's too
    chosen = plan(args.inputs, scheme=args.scheme, alpha=args.alpha, **_selection(args, **ranking))
    _print_notes(chosen)
    files = chosen.files
    order = {"template": args.template}  # selecting among `files` again keeps their order
    integers = args.integers
    if args.output:  # refused before scoring
        resolve(args.output, chosen.format, files, "sweep", overwrite=args.overwrite)

    from .evaluate import keras_scorer
    from .sweeps import greedy_soup, sweep

    evaluate, metric, maximize = keras_scorer(files[-1], args.data, args.metric, args.mode)
    if args.greedy:
        soup = greedy_soup(files, evaluate=evaluate, maximize=maximize, integers=integers, **order)
        print(f"{metric:>10}  file (each alone)")
        print("\n".join(f"{score:10.4f}  {path}" for path, score in soup.singles.items()))
        kept = ", ".join(path.name for path in soup.kept)
        print(f"soup of {len(soup.kept)} of {len(files)}: {kept}; {metric} {soup.score:.4f}")
        best = plan(soup.kept, scheme="equal", **order)
    else:
        result = sweep(
            files,
            args.scheme,
            evaluate=evaluate,
            alpha=args.alpha,
            maximize=maximize,
            integers=integers,
            **order,
        )
        print(f"{'last n':>6}  {metric} ({args.scheme})")
        print("\n".join(f"{n:>6}  {score:.4f}" for n, score in result.scores.items()))
        print(f"best: the last {result.best} ({metric} {result.scores[result.best]:.4f})")
        best = plan(files[-result.best :], scheme=args.scheme, alpha=args.alpha, **order)
    if args.output:
        print(f"wrote {run(best, args.output, overwrite=args.overwrite, integers=integers).output}")
    return 0


def _phema_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="streamavg phema",
        description="Make the EMA of relative width sigma_rel from the snapshots that "
        "streamavg.callbacks.PostHocEMA wrote (post-hoc EMA, Karras et al. 2024), or score a "
        "range of widths on held-out data (--sweep; needs Keras) and write the best.",
    )
    p.add_argument("directory", metavar="DIRECTORY", help="PostHocEMA's directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--sigma-rel",
        type=float,
        nargs="+",
        metavar="S",
        help="the widths to make, each in (0, 0.2887)",
    )
    what.add_argument(
        "--sweep", metavar="FIRST:LAST:COUNT", help="score COUNT widths, e.g. 0.02:0.25:24"
    )
    p.add_argument(
        "--step", type=int, metavar="T", help="the EMA at step T (default: the last snapshot's)"
    )
    p.add_argument("--data", metavar="NPZ", help="--sweep's held-out arrays x and y")
    p.add_argument(
        "--metric", help="--sweep's compiled metric (default: accuracy if there, else loss)"
    )
    p.add_argument(
        "--mode", choices=MODES, default="auto", help="whether lower or higher --metric is better"
    )
    p.add_argument(
        "--model", metavar="KERAS", help="--sweep's compiled model (default: DIRECTORY/model.keras)"
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="the output file, or a directory for several (default: DIRECTORY/phema-out/)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or weight table")
    return p


def _phema(argv: Sequence[str]) -> int:
    args = _phema_parser().parse_args(argv)
    from . import synthesis
    from .output import resolve

    if args.step is not None and args.step < 1:
        raise UsageError(f"--step must be a positive step; got {args.step}")
    scoring = [f"--{k}" for k in ("data", "metric", "model") if getattr(args, k)]
    if scoring and not args.sweep:
        raise UsageError(f"{', '.join(scoring)}: only with --sweep")
    out = args.output
    widths = args.sigma_rel
    if args.sweep:
        if not args.data:
            raise UsageError("--sweep needs --data NPZ, the held-out arrays to score on")
        from .evaluate import keras_scorer

        widths = synthesis.parse_sweep(args.sweep)
        if out and not (out.endswith(os.sep) or os.path.isdir(out)):  # refused before scoring
            files = [s.path for s in synthesis.snapshots(args.directory)]
            resolve(out, synthesis.FORMAT, files, "phema", overwrite=args.overwrite)
        model = args.model or os.path.join(args.directory, "model.keras")
        evaluate, metric, maximize = keras_scorer(model, args.data, args.metric, args.mode)
        scores = synthesis.sweep(args.directory, widths, evaluate=evaluate, step=args.step)
        print(f"{'sigma_rel':>9}  {metric}")
        print("\n".join(f"{s:9.4f}  {score:.4f}" for s, score in scores.items()))
        widths = [(max if maximize else min)(scores, key=scores.get)]
        print(f"best: sigma_rel {widths[0]:.4f} ({metric} {scores[widths[0]]:.4f})")
    if len(widths) > 1 and out and not (out.endswith(os.sep) or os.path.isdir(out)):
        raise UsageError("several --sigma-rel write one file each: give -o a directory")
    for s in widths:
        recipe = synthesis.plan(args.directory, s, step=args.step)
        if not args.quiet:
            print(f"sigma_rel {s:g} at step {recipe.step}:")
            print(_phema_table(recipe))
        result = synthesis.write(
            recipe, args.directory, out, overwrite=args.overwrite, progress=not args.quiet
        )
        _print_notes(result)
        print(f"wrote {result.output}")
    return 0


def _phema_table(recipe: Recipe) -> str:
    rows = [f"{'#':>3}  {'weight':>10}  {'sigma_rel':>9}  {'step':>9}  file"]
    pairs = zip(recipe.snapshots, recipe.plan.weights, strict=True)
    rows += [
        f"{i:>3}  {w:10.6f}  {s.sigma_rel:9g}  {s.step:>9}  {s.path}"
        for i, (s, w) in enumerate(pairs, 1)
    ]
    return "\n".join(rows)


class _Stopped(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every temporary file is cleaned up."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def _signal(e: BaseException | None) -> signal.Signals | None:
    """The signal that stopped the run, if `e` is it or was caused by it: a signal met
    inside a library's C code (h5py's) comes out wrapped in the library's error."""
    while e is not None:
        if isinstance(e, (KeyboardInterrupt, _Stopped)):
            return signal.SIGTERM if isinstance(e, _Stopped) else signal.SIGINT
        e = e.__cause__ or e.__context__
    return None


def _report(e: BaseException) -> int:
    """One line on stderr for why the run stopped, and its exit status; other errors (bugs)
    are raised with their traceback."""
    sig = _signal(e)
    if sig is not None:
        print(f"streamavg: stopped by {sig.name}; temporary files removed", file=sys.stderr)
        return 128 + sig
    if isinstance(e, StreamavgError):
        print(f"streamavg: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, BrokenPipeError):  # `streamavg inspect x | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if isinstance(e, OSError):
        where = e.filename or ""
        print(f"streamavg: error: {one_line(f'{where}: {e.strerror or e}')}", file=sys.stderr)
        return 1
    raise e


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Each command's parser, by how it is typed (the docs' reference is made from them)."""
    return {
        "streamavg": _parser(),
        "streamavg inspect": _inspect_parser(),
        "streamavg sweep": _sweep_parser(),
        "streamavg phema": _phema_parser(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 for bad input, 2 for bad usage,
    128 + the signal's number after SIGINT or SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if in_main else None
    try:
        commands = {"inspect": _inspect, "sweep": _sweep, "phema": _phema}
        if not argv:  # bare `streamavg`: what it does and how to ask for more
            print(f"usage: {USAGE}\nRun 'streamavg -h' for help.", file=sys.stderr)
            return UsageError.exit_code
        with command_line():
            if argv[:1] and argv[0] in commands:
                return commands[argv[0]](argv[1:])
            return _average(argv)
    except BaseException as e:
        return _report(e)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
