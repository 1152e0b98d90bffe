"""What every command may do to its output (-o): the rules that keep the user's data safe, in one place.

    with claim_output_dir(out, "fit", overwrite, resume, inputs=[model_dir, stats]):   # or claim_output_file
        ...                                                      # write the output

which combines the pieces, each usable alone:
    check_not_an_input(out, inputs=[model_dir, artifact_dir])   # -o equal to / inside an input: refused
    check_output_dir(out, overwrite=..., resume=..., what="artifact")   # non-empty needs --overwrite
    check_output_file(out, overwrite=...)                        # an existing file needs --overwrite
    with output_lock(out, "fit"):                                # one run per output; stale locks are taken over
        remove_debris(out)                                       # staging dirs / *.tmp of a killed run

The lock is an flock on OUT/.globe.lock (a sibling `.NAME.globe.lock` for a file output), so the kernel releases
it when its process dies, even by kill -9. The file also records pid, host and process start time: a lock whose
holder is still alive on this host (same pid and start time) is respected even where flock is not enforced, and
one whose holder is gone (dead pid, or a pid reused by another process) is stale and taken over.
Only the holder of the lock removes debris, so a concurrent run's temporary files are never touched.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from globe.errors import OutputError

log = logging.getLogger(__name__)

LOCK_NAME = ".globe.lock"
STAGING_PREFIX = ".globe-staging-"       # globe.export.files.staging_dir
TMP_SUFFIX = ".tmp"                      # globe.artifact.atomic_write: .NAME.XXXX.tmp beside the target
CHECKPOINT_DIR = ".globe_checkpoint"     # globe.run.resume_store's resume files inside a fit's OUT
WORK_DIR = ".globe_fit"                  # globe.run.compress: the fit inside a compress run's OUT
FINISHED_FILE = "banks.safetensors"      # what makes a directory a finished artifact (globe.artifact.BANKS_FILE)


def is_within(path: Path, parent: Path) -> bool:
    """True when `path` is `parent` or lies below it (both resolved, symlinks followed)."""
    path, parent = Path(path).resolve(), Path(parent).resolve()
    return path == parent or parent in path.parents


def check_not_an_input(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "-o") -> None:
    """OutputError when `out` is, or lies inside, one of the input directories/files (a model directory, an
    artifact, a --text file): writing there could replace the very data the run reads."""
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        if is_within(out, item) or (Path(out).exists() and Path(out).resolve() == Path(item).resolve()):
            kind = "directory" if Path(item).is_dir() else "file"
            raise OutputError(f"output {out} is {'inside ' if Path(out).resolve() != Path(item).resolve() else ''}"
                              f"the input {kind} {item}: writing there could destroy it; choose a {flag} outside it")


def check_output_dir(out: str | Path, overwrite: bool, resume: bool = False, what: str = "artifact",
                     flag: str = "-o") -> None:
    """Fail before any work if OUT cannot take the output: not a directory, not writable, or not empty
    (unless --overwrite replaces it or --resume continues an interrupted fit there)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory: choose another {flag}")
    if out.is_dir() and _user_entries(out) and not (overwrite or resume):
        if (out / CHECKPOINT_DIR).is_dir():
            state, hint = "holds an interrupted fit", "--resume to continue it or --overwrite to start again"
        elif (out / FINISHED_FILE).exists():
            state, hint = "already holds an artifact", "--overwrite to replace it"
        else:
            state, hint = "is not empty", f"--overwrite to write the {what} among its files"
        raise OutputError(f"output directory {out} {state}: pass {hint}, or choose another {flag}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise OutputError(f"output directory {out} is not writable ({exc.strerror}): choose another {flag}") from None


def check_output_file(out: str | Path, overwrite: bool, flag: str = "-o") -> None:
    """Fail before any work if the output file exists (without --overwrite), is a directory, or its directory
    cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"output {out} is a directory: pass a file name to {flag}")
    if out.exists() and not overwrite:
        raise OutputError(f"output file {out} already exists: pass --overwrite to replace it, or choose another "
                          f"{flag}")
    writable_dir(out.parent, flag)


def check_apart(named: dict[str, str | Path | None], nested: bool = True) -> None:
    """OutputError when two outputs of one command (by flag) are the same path or (nested) one lies inside the
    other: one would overwrite, or be swapped away with, the other."""
    given = [(flag, Path(path)) for flag, path in named.items() if path is not None]
    for i, (flag, path) in enumerate(given):
        for other, where in given[i + 1:]:
            same = path.resolve() == where.resolve()
            if same or (nested and (is_within(path, where) or is_within(where, path))):
                raise OutputError(f"{flag} {path} and {other} {where} are the same place or one lies inside the "
                                  f"other: give each output its own path")


def is_metrics_log(path: Path) -> bool:
    """Whether file `path` is a metrics log globe appends to: JSON lines, each a record with an "event"."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return all(isinstance(doc := json.loads(line), dict) and "event" in doc for line in lines if line.strip())
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def check_log_file(path: str | Path, flag: str = "--metrics", overwrite: bool = False, append: bool = False) -> Path:
    """A JSONL metrics output, before any work: not a directory; an existing file is replaced only with
    --overwrite, or appended to (append) only when it is a metrics log (is_metrics_log): a user's other file is
    never changed. The writer (globe.tracking.JsonlSink) replaces it in one rename."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory: pass a file name")
    if path.exists() and not overwrite:
        if not append:
            raise OutputError(f"{flag} file {path} already exists: pass --overwrite to replace it, or choose another "
                              f"{flag}")
        if not is_metrics_log(path):
            raise OutputError(f"{flag} file {path} exists and is not a globe metrics log (JSON lines with an "
                              f"\"event\"): results are only appended to one; choose another {flag}")
    parent = path.parent.resolve()
    while not parent.exists():                 # created when the first record is written, not now
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputError(f"{flag} {path}: {parent} is not a writable directory; choose another {flag}")
    return path


def check_output_files(out_dir: str | Path, names: Iterable[str], overwrite: bool, flag: str) -> Path:
    """Output directory `out_dir` that will receive files `names` (plots): refused when it is a file, or when one
    of those files exists and overwrite is not given; other files in it are never touched."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{flag} {out_dir} is a file, not a directory: choose another {flag}")
    clash = sorted(name for name in names if (out_dir / name).exists())
    if clash and not overwrite:
        raise OutputError(f"{flag} {out_dir} already holds {', '.join(clash)}: pass --overwrite to replace "
                          f"{'them' if len(clash) > 1 else 'it'}, or choose another {flag}")
    return out_dir


def writable_dir(path: str | Path, flag: str = "-o") -> Path:
    """Create directory `path` (and its parents) if needed; OutputError naming it when that fails or when it is
    a file or not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is not a directory: choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path} ({exc.strerror}): choose another {flag}") from None
    if not os.access(path, os.W_OK):
        raise OutputError(f"{path} is not writable: choose another {flag}")
    return path


def _user_entries(out: Path) -> list[Path]:
    """Entries of OUT that are not globe's own lock or crash debris."""
    return [p for p in out.iterdir() if p.name != LOCK_NAME and not _is_debris(p)]


# atomic_write's temp files: tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") adds 8 random characters.
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _is_debris(path: Path) -> bool:
    return ((path.name.startswith(STAGING_PREFIX) or path.name == WORK_DIR) and path.is_dir()) or \
        (bool(_TEMP.match(path.name)) and path.is_file())


def remove_debris(out: str | Path) -> list[str]:
    """Remove what a killed run leaves in OUT (staging directories, temporary files, also inside the resume
    store); call it while holding output_lock(out). Returns the names removed. A file output cleans its own
    `.NAME.*.tmp` siblings."""
    out = Path(out)
    if out.is_dir():
        candidates = [p for d in (out, out / CHECKPOINT_DIR) if d.is_dir() for p in d.iterdir() if _is_debris(p)]
    else:
        prefix = f".{out.name}."
        candidates = [p for p in out.parent.glob(f"{glob.escape(prefix)}*{TMP_SUFFIX}") if _is_debris(p)
                      and len(p.name) == len(prefix) + 8 + len(TMP_SUFFIX)] if out.parent.is_dir() else []
    for path in candidates:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        log.info("removed %s left by an interrupted run", path)
    return [p.name for p in candidates]


# ---- whole-directory swaps (an export is one atomic step) ----
SWAP_STAGING = ".globe-staging-"          # .OUT.globe-staging-XXXX beside OUT: the new output being written
SWAP_OLD = ".globe-old-"                  # .OUT.globe-old-XXXX beside OUT: the previous output, set aside


def swap_siblings(out: str | Path, tag: str) -> list[Path]:
    """The staging (tag SWAP_STAGING) or set-aside (SWAP_OLD) directories of output `out`, oldest first."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    found = [p for p in out.parent.glob(f".{glob.escape(out.name)}{tag}*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def recover_swap(out: str | Path) -> bool:
    """Undo a swap killed between its two renames: OUT missing and its previous version set aside -> renamed back.
    Returns whether it did. Safe without the lock (a rename is atomic; losing a race leaves OUT as the winner made it)."""
    out = Path(out)
    olds = swap_siblings(out, SWAP_OLD)
    if out.exists() or not olds:
        return False
    try:
        os.rename(olds[-1], out)
    except OSError:
        return False
    log.warning("restored %s from %s, set aside by an interrupted export", out, olds[-1].name)
    return True


def remove_swap_debris(out: str | Path) -> list[str]:
    """Remove staging and set-aside directories a killed swap of `out` left beside it (call while holding the
    lock of `out`, after recover_swap)."""
    gone = []
    for path in [*swap_siblings(out, SWAP_STAGING), *swap_siblings(out, SWAP_OLD)]:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s left by an interrupted export", path)
        gone.append(path.name)
    return gone


# ---- the lock ----
def lock_path(out: str | Path) -> Path:
    """OUT/.globe.lock for a directory output, .NAME.globe.lock beside a file output."""
    out = Path(out)
    return out / LOCK_NAME if out.is_dir() else out.parent / f".{out.name}{LOCK_NAME}"


def process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def holder_alive(holder: dict) -> bool:
    """Whether the process recorded in a lock file still runs: same host, live pid, same start time. A holder
    on another host cannot be checked and counts as alive."""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    if holder["pid"] == os.getpid() or not pid_alive(holder["pid"]):
        return False
    start = process_start(holder["pid"])
    return holder.get("start") is None or start is None or start == holder["start"]


def _read_holder(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _busy(out: Path, path: Path, holder: dict) -> OutputError:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = holder.get("time")
    when = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, (int, float)) \
        else ""
    return OutputError(f"output {out} is in use by another `globe {holder.get('command', '?')}` ({who}{when}): "
                       f"wait for it to finish or choose another -o (if no such run exists, delete {path})")


@contextmanager
def output_lock(out: str | Path, command: str) -> Iterator[Path]:
    """Hold the lock of output `out` (a directory that exists, or a file path) for the duration of the block;
    OutputError when another live run holds it."""
    import fcntl
    out = Path(out)
    path = lock_path(out)
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise _busy(out, path, _read_holder(path)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino      # not unlinked by a finishing holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputError(f"cannot take the lock {path}: another run keeps replacing it; choose another -o")
    try:
        holder = _read_holder(path)
        if holder and holder_alive(holder):
            raise _busy(out, path, holder)
        if holder:
            log.info("taking over the stale lock %s of pid %s (no longer running)", path, holder.get("pid"))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
              "time": time.time(), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        yield path
    finally:
        try:
            if _read_holder(path).get("pid") == os.getpid():
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)


# ---- what a command calls: check, lock, clean, and undo a directory it created if it fails ----
@contextmanager
def claim_output_dir(out: str | Path, command: str, overwrite: bool, resume: bool = False, what: str = "artifact",
                     inputs: Iterable[str | Path | None] = (), keep: Iterable[str] = (CHECKPOINT_DIR,),
                     flag: str = "-o") -> Iterator[Path]:
    """Hold output directory `out` for one run of `command`: refused if it is an input or holds the user's
    files (without --overwrite / --resume) or another run holds it; debris of a killed run is removed first
    (also when the run is then refused); a directory this run created is removed again if the run fails,
    unless it holds one of `keep` (a fit's checkpoints, for --resume)."""
    out = Path(out)
    check_not_an_input(out, inputs, flag)
    recover_swap(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory: choose another {flag}")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output directory {out} is not writable ({exc.strerror}): choose another {flag}") from None
    with output_lock(out, command):
        remove_debris(out)
        remove_swap_debris(out)
        try:
            check_output_dir(out, overwrite, resume, what, flag)
            yield out
        except BaseException:
            if created and not any((out / name).exists() for name in keep):
                shutil.rmtree(out, ignore_errors=True)     # leave no half-made output behind
            raise


@contextmanager
def claim_output_file(out: str | Path, command: str, overwrite: bool, inputs: Iterable[str | Path | None] = (),
                      flag: str = "-o") -> Iterator[Path]:
    """The same for an output file: refused if it is an input, exists without --overwrite, or another run
    writes it; temp files a killed run left beside it are removed."""
    out = Path(out)
    check_not_an_input(out, inputs, flag)
    check_output_file(out, overwrite, flag)
    with output_lock(out, command):
        remove_debris(out)
        yield out


# ---- JSON that every reader accepts ----
def finite(value):
    """A JSON-safe copy of `value`: NaN / Infinity become None (null), tuples lists, tensors and numpy scalars
    plain Python numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value, **kwargs) -> str:
    """json.dumps that never writes NaN or Infinity (they become null): the text is valid JSON."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
