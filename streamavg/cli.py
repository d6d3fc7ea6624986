"""The command line: `streamavg PATH... [options]`, `streamavg inspect FILE`, `streamavg sweep`."""

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

from ._version import __version__
from .api import OPTIMIZER_POLICIES, Plan, plan, run
from .errors import StreamavgError, UsageError, command_line
from .formats import PROVENANCE_ATTR, Checkpoint
from .output import check_output, destination
from .schemes import SCHEMES

USAGE = """\
streamavg [options] PATH...              average checkpoints into one
       streamavg inspect FILE                   list a checkpoint's tensors
       streamavg sweep PATH... --data NPZ       score the average of the last n, or a soup
       streamavg -h | -V                        help, version"""

DESCRIPTION = """\
Average Keras checkpoints (.keras, .weights.h5, legacy .h5) with constant memory.
Checkpoints are ordered by the epoch number in their names; the newest weighs most.
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
    out.add_argument(
        "--max-memory",
        metavar="SIZE",
        type=_size,
        help="cap the working buffers, e.g. 64M or 1G (default: a few MiB per core, fastest); "
        "memory never grows with the model's size or the number of checkpoints",
    )
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar or weight table")
    p.add_argument("-V", "--version", action="version", version=f"streamavg {__version__}")
    return p


def _add_selection(p: argparse.ArgumentParser) -> None:
    sel = p.add_argument_group("selection")
    sel.add_argument(
        "--pattern",
        metavar="GLOB",
        help="files to take from directories (default: *.keras, *.h5, *.hdf5)",
    )
    sel.add_argument("--last", type=int, metavar="N", help="keep only the newest N checkpoints")
    sel.add_argument(
        "--epochs", metavar="FIRST:LAST", help="keep epochs FIRST to LAST inclusive, e.g. 490:499"
    )


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
    p = plan(
        args.inputs,
        scheme=args.scheme,
        alpha=args.alpha,
        weights=args.weights,
        pattern=args.pattern,
        last=args.last,
        epochs=args.epochs,
    )
    if p.by_mtime:
        print(
            "streamavg: note: file names carry no epoch number; ordered by modification time",
            file=sys.stderr,
        )
    if not args.quiet:
        print(_table(p))
    result = run(
        p,
        args.output,
        optimizer=args.optimizer,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        max_memory=args.max_memory,
        progress=not args.quiet,
    )
    peak_mb = _peak_rss_kib() / 1024
    print(
        f"averaged {_count(len(p.files), 'file')} ({p.scheme}) into {result.output} "
        f"in {time.perf_counter() - started:.2f} s, peak memory {peak_mb:.0f} MB"
    )
    return 0


def _count(n: int, noun: str) -> str:
    """`1 file`, `2 files`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _peak_rss_kib() -> int:
    """This process's peak RSS; /proc's VmHWM, unlike ru_maxrss, forgets the parent we forked."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def inspect(path: str) -> str:
    """A readable listing of a checkpoint: format, tensors, shapes, dtypes and sizes."""
    with Checkpoint(path, optimizer=True) as ck:
        ck.check_heaps()
        attrs = ck.h5.attrs
        total = sum(t.nbytes for t in ck.tensors.values())
        lines = [
            f"{ck.path}: {ck.format}, {_count(len(ck.tensors), 'tensor')}, {total:,} bytes "
            f"(a {ck.size:,}-byte HDF5 file)"
        ]
        if "keras_version" in attrs:
            lines[0] += f", written by Keras {_text(attrs['keras_version'])}"
        if PROVENANCE_ATTR in attrs:
            lines.append(f"averaged by streamavg: {json.loads(_text(attrs[PROVENANCE_ATTR]))}")
        width = max([len(n) for n in ck.tensors] + [6])
        lines.append(
            f"{'part':<9}  {'tensor':<{width}}  {'shape':<16}  {'dtype':<8}  {'bytes':>12}"
        )
        for t in ck.tensors.values():
            lines.append(
                f"{t.part:<9}  {t.name:<{width}}  {t.shape!s:<16}  "
                f"{t.dtype.name:<8}  {t.nbytes:>12,}"
            )
        for part in ("model", "optimizer", "other"):
            ts = [t for t in ck.tensors.values() if t.part == part]
            if ts:
                lines.append(
                    f"{part}: {_count(len(ts), 'tensor')}, {sum(t.nbytes for t in ts):,} bytes"
                )
    return "\n".join(lines)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _inspect(argv: Sequence[str]) -> int:
    p = _Parser(prog="streamavg inspect", description="List a checkpoint's tensors.")
    p.add_argument("file", metavar="FILE")
    print(inspect(p.parse_args(argv).file))
    return 0


def _sweep(argv: Sequence[str]) -> int:
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
    p.add_argument("-o", "--output", metavar="PATH", help="write the best average or soup here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    if args.greedy and args.scheme != "equal":
        raise UsageError("--greedy averages its soup equally; it takes no --scheme")
    select = {"pattern": args.pattern, "last": args.last, "epochs": args.epochs}
    files = plan(args.inputs, scheme=args.scheme, alpha=args.alpha, **select).files
    if args.output:  # refuse a bad output now, not after scoring every average
        with Checkpoint(files[-1]) as newest:
            check_output(destination(args.output, newest, "sweep", 1), files, args.overwrite)

    from .evaluate import keras_scorer
    from .sweeps import greedy_soup, sweep

    evaluate, metric, maximize = keras_scorer(files[-1], args.data, args.metric)
    if args.greedy:
        soup = greedy_soup(files, evaluate=evaluate, maximize=maximize)
        print(f"{metric:>10}  file (each alone)")
        print("\n".join(f"{score:10.4f}  {path}" for path, score in soup.singles.items()))
        kept = ", ".join(path.name for path in soup.kept)
        print(f"soup of {len(soup.kept)} of {len(files)}: {kept}; {metric} {soup.score:.4f}")
        best = plan(soup.kept, scheme="equal")
    else:
        result = sweep(files, args.scheme, evaluate=evaluate, alpha=args.alpha, maximize=maximize)
        print(f"{'last n':>6}  {metric} ({args.scheme})")
        print("\n".join(f"{n:>6}  {score:.4f}" for n, score in result.scores.items()))
        print(f"best: the last {result.best} ({metric} {result.scores[result.best]:.4f})")
        best = plan(files[-result.best :], scheme=args.scheme, alpha=args.alpha)
    if args.output:
        print(f"wrote {run(best, args.output, overwrite=args.overwrite).output}")
    return 0


class _Stopped(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every temporary file is cleaned up."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0, 1 for bad input, 2 for bad usage,
    128 + the signal's number after SIGINT or SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if in_main else None
    try:
        commands = {"inspect": _inspect, "sweep": _sweep}
        if not argv:  # bare `streamavg`: what it does and how to ask for more
            print(f"usage: {USAGE}\nRun 'streamavg -h' for help.", file=sys.stderr)
            return UsageError.exit_code
        with command_line():
            if argv[:1] and argv[0] in commands:
                return commands[argv[0]](argv[1:])
            return _average(argv)
    except StreamavgError as e:
        print(f"streamavg: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `streamavg inspect x | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        print(f"streamavg: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stopped) as e:
        sig = signal.SIGTERM if isinstance(e, _Stopped) else signal.SIGINT
        print(f"streamavg: stopped by {sig.name}; temporary files removed", file=sys.stderr)
        return 128 + sig
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
