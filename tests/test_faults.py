"""Faults and hostile files: signals, full disks, concurrent runs, inputs still being written,
archives and datasets built to hurt. Each test fails without the guarantee it names."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import files, killed_while_writing, snapshot, temporary, wait_for_temporary

import streamavg
from streamavg import publish
from streamavg.cli import main
from streamavg.formats import open_checkpoint
from streamavg.formats.keras_zip import WEIGHTS_MEMBER

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
LINKS = 80  # hard links to one real checkpoint: a run that lasts a while, at no disk cost


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LINKS names for one 24 MB Keras checkpoint: averaging them takes the better part of
    a second, long enough to signal, kill or race a run while it writes."""
    keras = pytest.importorskip("keras")
    root = tmp_path_factory.mktemp("slow")
    model = keras.Sequential(
        [keras.Input((1000,)), keras.layers.Dense(2000), keras.layers.Dense(2000)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's note on the legacy .h5 format
        model.save(root / "model.h5")
    (root / "ckpts").mkdir()
    for i in range(LINKS):
        os.link(root / "model.h5", root / "ckpts" / f"model_{i:03d}.h5")
    return root / "ckpts"


def start(*args: object, preexec=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamavg", *map(str, args), "--quiet"]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def limit(kind: int, value: int):
    def preexec() -> None:
        resource.setrlimit(kind, (value, value))

    return preexec


# -- 1. killed runs ------------------------------------------------------------------------


def test_sigkill_leaves_no_output_and_the_next_run_removes_the_leftover(
    slow, checkpoints, tmp_path
):
    out = tmp_path / "avg.h5"
    _, temp = killed_while_writing(tmp_path, slow, "-o", out)
    assert not out.exists()
    assert re.fullmatch(r"\.avg\.h5\.streamavg-\w{8}\.file", temp.name)
    assert temp.is_dir()  # clearly named, hidden: no scan takes what it holds for an input
    again = start(checkpoints / "k3-h5", "-o", tmp_path / "other.h5")
    assert again.wait() == 0, again.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.h5"]


UNSHARE_PID = ["unshare", "--pid", "--fork", "--mount-proc"]


@pytest.mark.parametrize("folder", [False, True], ids=["file", "folder"])
def test_a_run_in_another_pid_namespace_leaves_a_live_temporary_output_alone(
    checkpoints, tmp_path, folder
):
    """Two containers sharing a volume and a host name, not their PIDs: a run in a PID
    namespace of its own, where this process's PID is no one's, writes into the folder
    where this process is writing an output, finds its temporary file or folder there,
    and leaves it be (it is locked), so that this output is then published whole."""
    if shutil.which("unshare") is None or subprocess.run([*UNSHARE_PID, "true"]).returncode:
        pytest.skip("needs `unshare --pid` (root, or a user namespace)")
    out = tmp_path / ("avg" if folder else "avg.h5")
    stage = publish.atomic_dir(out, False) if folder else publish.atomic_output(out, False)
    with stage as tmp:
        written = tmp / "part" if folder else tmp
        written.write_bytes(b"written so far")
        assert publish.published(written) == (out / "part" if folder else out)
        (entry,) = temporary(tmp_path)
        args = [checkpoints / "k3-h5", "-o", tmp_path / "other.h5", "--quiet"]
        cmd = [*UNSHARE_PID, sys.executable, "-m", "streamavg", *map(str, args)]
        other = subprocess.run(cmd, capture_output=True, text=True)
        assert (other.returncode, other.stderr) == (0, "")
        assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name, "other.h5"]
        assert written.read_bytes() == b"written so far"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, "other.h5"]
    assert (out / "part" if folder else out).read_bytes() == b"written so far"


HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize(
    "name",
    [".avg.h5.streamavg-k2x9_q0z.file", ".avg.h5.streamavg-4242@host.k2x9_q0z.tmp"],
    ids=["folder", "old-style-file"],
)
def test_a_temporary_output_locked_by_a_live_process_stays_until_it_exits(
    checkpoints, tmp_path, name
):
    """Whatever its name says (a folder as runs now make them, or a file named by an
    older version for its process and host), a temporary output that another process
    holds locked is left alone; once that process is gone, the next run removes it."""
    entry = tmp_path / name
    if entry.suffix == ".file":
        entry.mkdir()
        (entry / "avg.h5.tmp").write_bytes(b"written so far")
    else:
        entry.write_bytes(b"written so far")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, entry], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline() == b"locked\n"
    one = start(checkpoints / "k3-h5", "-o", tmp_path / "one.h5")
    assert (one.wait(), one.stderr.read()) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, "one.h5"]
    written = entry / "avg.h5.tmp" if entry.is_dir() else entry
    assert written.read_bytes() == b"written so far"
    holder.stdin.close()
    assert holder.wait() == 0
    two = start(checkpoints / "k3-h5", "-o", tmp_path / "two.h5")
    assert (two.wait(), two.stderr.read()) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_remove_the_temporary_file(slow, tmp_path, sig):
    out = tmp_path / "new" / "avg.h5"
    # A job started in the background inherits SIGINT ignored, and Python then keeps it so
    proc = start(slow, "-o", out, preexec=lambda: signal.signal(sig, signal.SIG_DFL))
    wait_for_temporary(out.parent, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (
        128 + sig,
        f"streamavg: stopped by {sig.name}; temporary files removed\n",
    )
    assert list(tmp_path.iterdir()) == []  # the folder made for the output went too


# -- 2. full disk, write errors ------------------------------------------------------------


def need(path: Path) -> int:
    with open_checkpoint(path) as ck:
        return sum(t.nbytes for t in ck.tensors.values() if t.averaged)


def test_output_larger_than_the_file_size_limit_is_refused_before_starting(checkpoints, tmp_path):
    src = checkpoints / "k3-weights"
    out = tmp_path / "avg.weights.h5"
    n = need(files(src)[-1])
    proc = start(src, "-o", out, preexec=limit(resource.RLIMIT_FSIZE, n - 1))
    _, err = proc.communicate()
    assert (proc.returncode, err) == (
        1,
        f"streamavg: error: {out}: needs at least {n:,} bytes, "
        f"above the file size limit of {n - 1:,}\n",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("case", "extra"),
    [("k3-weights", []), ("k3-keras", []), ("k3-h5", []), ("k3-keras", ["--optimizer", "newest"])],
)
def test_disk_full_while_writing_gives_one_line_and_no_file(checkpoints, tmp_path, case, extra):
    """The data fits the limit (the check passes) but the whole file does not: writes fail,
    whether in our writes, in HDF5 copying the template's other tensors, or in closing."""
    src = checkpoints / case
    out = tmp_path / f"avg{''.join(files(src)[-1].suffixes)}"
    fsize = limit(resource.RLIMIT_FSIZE, need(files(src)[-1]))
    proc = start(src, "-o", out, *extra, preexec=fsize)
    _, err = proc.communicate()
    assert (proc.returncode, err) == (
        1,
        f"streamavg: error: {out}: cannot write (File too large)\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_gives_one_line(checkpoints, capsys):
    out = Path("/sys/streamavg-test.weights.h5")  # sysfs takes no new entries, even from root
    assert main([str(checkpoints / "k3-weights"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    denied = "Operation not permitted|Permission denied|Read-only file system"  # mkdir's EPERM
    assert re.fullmatch(rf"streamavg: error: {out}: cannot write \(({denied})\)\n", err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_directory_gives_one_line(checkpoints, tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        out = tmp_path / "avg.weights.h5"
        assert main([str(checkpoints / "k3-weights"), "-o", str(out)]) == 1
        assert capsys.readouterr().err == (
            f"streamavg: error: {out}: cannot write (Permission denied)\n"
        )
    finally:
        tmp_path.chmod(0o755)


def test_symlinked_output_is_refused(checkpoints, tmp_path, capsys):
    target, link = tmp_path / "target.weights.h5", tmp_path / "link.weights.h5"
    link.symlink_to(target)
    for extra in ([], ["--overwrite"]):
        assert main([str(checkpoints / "k3-weights"), "-o", str(link), *extra]) == 2
        assert capsys.readouterr().err == (
            f"streamavg: error: {link}: is a symbolic link (name its target, or remove the link)\n"
        )
    assert not target.exists() and link.is_symlink()


# -- 4. hostile archives and datasets -------------------------------------------------------


def rezip(path: Path, extra: list[tuple[str, bytes]]) -> None:
    """Rewrite a .keras archive with its members, then `extra` ones."""
    with zipfile.ZipFile(path) as src:
        members = [(i, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate we mean to write
        for info, data in members:
            out.writestr(info, data)
        for name, data in extra:
            out.writestr(name, data)


def declare_huge(path: Path) -> None:
    """Make the central directory claim the weights member expands to 4 GB (a zip bomb)."""
    data = bytearray(path.read_bytes())
    entry = data.find(b"PK\x01\x02")
    while entry >= 0:
        name_len = int.from_bytes(data[entry + 28 : entry + 30], "little")
        if data[entry + 46 : entry + 46 + name_len] == WEIGHTS_MEMBER.encode():
            data[entry + 24 : entry + 28] = (0xFFFF_FFF0).to_bytes(4, "little")
        entry = data.find(b"PK\x01\x02", entry + 4)
    path.write_bytes(bytes(data))


def replace_dataset(name: str, **kwargs):
    def change(path: Path) -> None:
        with h5py.File(path, "a") as f:
            del f[name]
            f.create_dataset(name, **kwargs)

    return change


KERNEL = "layers/dense/vars/0"
HOSTILE = {
    "duplicate member": (
        "k3-keras",
        lambda p: rezip(p, [(WEIGHTS_MEMBER, b"\x89HDF\r\n\x1a\n")]),
        f"{WEIGHTS_MEMBER}: duplicate member in .keras archive",
    ),
    "member escapes": (
        "k3-keras",
        lambda p: rezip(p, [("../../evil.sh", b"rm -rf ~")]),
        "../../evil.sh: member path escapes the .keras archive",
    ),
    "absolute member": (
        "k3-keras",
        lambda p: rezip(p, [("/etc/cron.d/evil", b"* * * * * root true")]),
        "/etc/cron.d/evil: member path escapes the .keras archive",
    ),
    "zip bomb": (
        "k3-keras",
        declare_huge,
        f"{WEIGHTS_MEMBER}: declares 4,294,967,280 bytes from ",
    ),
    "enormous declared shape": (
        "k3-weights",
        replace_dataset(KERNEL, shape=(10**12,), dtype="f4", chunks=(1 << 16,)),
        f"{KERNEL}: data is missing (chunks never written)",
    ),
    "compound dtype": (
        "k3-weights",
        replace_dataset(KERNEL, data=np.zeros((6, 16), [("a", "<f4")])),
        f"{KERNEL}: unsupported dtype [('a', '<f4')]",
    ),
    "string dtype": (
        "k3-weights",
        replace_dataset(KERNEL, data=np.full((6, 16), b"nan")),
        f"{KERNEL}: unsupported dtype |S3",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_files_are_refused_before_anything_is_read(case_copy, tmp_path, capsys, name):
    case, damage, message = HOSTILE[name]
    d = case_copy(case)
    victim = files(d)[1]
    damage(victim)
    before = snapshot(d)
    assert main([str(d), "-o", str(tmp_path / f"avg{''.join(victim.suffixes)}")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"streamavg: error: {victim}: {message}") and err.count("\n") == 1
    assert snapshot(d) == before


def test_a_global_heap_that_would_hang_hdf5_is_refused(case_copy, tmp_path):
    """HDF5 loops forever on a zero-size object in a global heap, where Keras keeps the
    newest checkpoint's model config: found by the fuzz test, checked before decoding."""
    d = case_copy("k3-h5")
    newest = files(d)[-1]
    data = bytearray(newest.read_bytes())
    first = data.find(b"GCOL") + 16
    (length,) = struct.unpack_from("<Q", data, first + 8)
    second = first + 16 + -(-length // 8) * 8
    data[second : second + 16] = bytes(16)
    newest.write_bytes(bytes(data))
    proc = start(d, "-o", tmp_path / "avg.h5")
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (
        1,
        f"streamavg: error: {newest}: corrupt HDF5 (bad object in a global heap)\n",
    )


def test_safe_mode_refuses_a_lambda_layer_that_averaging_never_runs(tmp_path, capsys):
    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2), keras.layers.Dense(2)]
    )
    model.compile(optimizer="sgd", loss="mse")
    for epoch in (1, 2):
        model.save(tmp_path / f"model_{epoch}.keras")
    np.savez(tmp_path / "data.npz", x=np.ones((4, 3), "f4"), y=np.ones((4, 2), "f4"))
    out = tmp_path / "out" / "avg.keras"
    assert main([str(tmp_path), "--pattern", "*.keras", "-o", str(out), "--quiet"]) == 0
    capsys.readouterr()
    newest = tmp_path / "model_2.keras"
    assert main(["sweep", str(newest), "--data", str(tmp_path / "data.npz")]) == 1
    assert capsys.readouterr().err == (
        f"streamavg: error: {newest}: cannot load the model in safe mode (Requested the "
        "deserialization of a `Lambda` layer whose `function` is a Python lambda)\n"
    )


# -- 5. concurrent use, inputs still being written ------------------------------------------


def test_two_runs_writing_one_output_never_mix(slow, checkpoints, tmp_path):
    """Both finish; the output is all of one average or all of the other, never a blend."""
    out = tmp_path / "avg.h5"
    runs = [start(src, "-o", out, "--overwrite") for src in (slow, checkpoints / "k3-h5")]
    assert [r.wait() for r in runs] == [0, 0]
    got = streamavg.average_tensors([out])
    candidates = [streamavg.average_tensors([src]) for src in (slow, checkpoints / "k3-h5")]
    assert any(
        list(got) == list(c) and all(np.array_equal(got[k], c[k]) for k in c) for c in candidates
    )
    assert temporary(tmp_path) == []


def test_two_runs_without_overwrite_one_wins_the_other_refuses(slow, tmp_path):
    out = tmp_path / "avg.h5"
    runs = [start(slow, "-o", out) for _ in range(2)]
    results = sorted((r.wait(), r.stderr.read()) for r in runs)
    assert results == [
        (0, ""),
        (2, f"streamavg: error: {out}: already exists (pass --overwrite to replace it)\n"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.h5"]


def test_input_open_for_writing_is_refused(case_copy, tmp_path, capsys):
    d = case_copy("k3-weights")
    victim = files(d)[2]
    with h5py.File(victim, "a"):  # as a training process saving into it would hold it
        proc = start(d, "-o", tmp_path / "avg.weights.h5")
        _, err = proc.communicate()
    assert (proc.returncode, err) == (
        1,
        f"streamavg: error: {victim}: open for writing in another process (still being saved?)\n",
    )


def test_input_removed_during_the_run_is_refused(slow, tmp_path):
    d = tmp_path / "ckpts"
    shutil.copytree(slow, d, copy_function=os.link)
    newest = files(d)[-1]
    out = tmp_path / "out" / "avg.h5"
    proc = start(d, "-o", out)
    wait_for_temporary(out.parent, proc)
    newest.unlink()  # a trainer pruning old checkpoints
    _, err = proc.communicate()
    assert (proc.returncode, err) == (
        1,
        f"streamavg: error: {newest}: removed while being averaged\n",
    )
    assert not out.parent.exists()


def test_input_that_changes_during_the_run_is_refused(slow, tmp_path):
    d = tmp_path / "ckpts"
    shutil.copytree(slow, d, copy_function=os.link)
    newest = files(d)[-1]
    newest.unlink()
    shutil.copy(files(slow)[-1], newest)  # its own inode, unlike the links
    out = tmp_path / "out" / "avg.h5"
    proc = start(d, "-o", out)
    wait_for_temporary(out.parent, proc)
    with newest.open("ab") as f:  # a trainer still appending to it
        f.write(b"\0")
    _, err = proc.communicate()
    assert (proc.returncode, err) == (
        1,
        f"streamavg: error: {newest}: changed while being averaged (still being written?)\n",
    )
    assert not out.parent.exists()


def test_a_signal_met_inside_h5py_is_reported_as_the_signal(capsys):
    """h5py's Cython wrappers turn an exception raised by the signal handler into a
    SystemError "returned a result with an exception set" (seen under load, while copying
    the template's attributes); the run still stops with its one line and exit code."""
    from streamavg.cli import _report, _stop

    try:
        try:
            _stop(signal.SIGTERM, None)
        except BaseException as stopped:
            raise SystemError("returned a result with an exception set") from stopped
    except SystemError as wrapped:
        assert _report(wrapped) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "streamavg: stopped by SIGTERM; temporary files removed\n"
