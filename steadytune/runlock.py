"""One process per run folder, and a run that never overwrites what the user put there.

    check_new(run_dir)          before a new run's setup: locks the folder (claim), then refuses
                                one holding a run; the lock is kept for the rest of setup
    claim(run_dir)              locks the folder (creating it), then finishes or removes the
                                leftovers of interrupted writes (checkpoint.recover)
    release(run_dir)            drops the lock; a folder claim created and nothing else filled is
                                removed again (a failed start leaves no empty folder)
    start(cfg, run_dir, ...)    at the end of setup: claim, set an earlier attempt's metrics aside,
                                write the resolved config

The lock is `RUN/.steadytune.lock`, held with flock(2) from before the first check that relies on
it until the process ends (or `release`), and holding the pid: the kernel drops it when the process
dies however it dies (SIGKILL, power loss), so a stale lock is simply taken over. Taking it is one
atomic step (flock on the opened file; a lock file unlinked meanwhile by a releasing process is
noticed and opened again). Where flock is not supported (some network filesystems) the pid in the
file decides: a live process other than this one holds the folder.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import yaml

from .errors import UserError

LOCK = ".steadytune.lock"
# The first line of the config.yaml steadytune writes: how a later start tells its own file (safe
# to rewrite) from the user's (never touched).
CONFIG_HEADER = "# written by steadytune: this run's resolved configuration (edits here are not read back)\n"
OWN_CONFIG = "steadytune-config.yaml"  # where it goes when the user's config.yaml is in the run folder
_held: dict[Path, int] = {}  # run folder -> descriptor of its lock file, held by this process
_created: set[Path] = set()  # run folders claim created (removed by release while they hold only the lock)
_made: set[Path] = set()  # run folders whose lock file claim created (removed by release)


def _rank() -> int:
    import mlx.core as mx

    return mx.distributed.init().rank()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _pid_in(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _try_lock(fd: int) -> int | None:
    """Lock `fd`; None on success, else the holder's pid (0 when it cannot be read)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _pid_in(fd) or 0
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        pid = _pid_in(fd)  # no flock here: a live pid in the file holds the folder
        return pid if pid and pid != os.getpid() and _alive(pid) else None


def _refuse(run_dir: Path, pid: int):
    who = f"pid {pid}" if pid else "another process"
    raise UserError(f"{run_dir}: another steadytune process ({who}) is using this run folder; wait for it "
                    "to finish, or pass another --out")


def holder(run_dir: Path) -> int | None:
    """The pid of another process holding run_dir's lock (0: unknown), or None; creates nothing."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _held:
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)  # closing drops a lock this probe took


def claim(run_dir: Path) -> None:
    """Lock run_dir for this process (creating the folder), then repair interrupted writes.
    Only rank 0 of a distributed run writes, so only it locks."""
    from . import checkpoint as ckpt

    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held or _rank() != 0:
        return
    fd = _lock(run_dir, key)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd
    atexit.unregister(_release_all)  # registered once, however many folders are claimed
    atexit.register(_release_all)
    try:
        notes = ckpt.recover(run_dir)
    except BaseException:
        release(run_dir)
        raise
    for note in notes:
        print(note)


def _lock(run_dir: Path, key: Path) -> int:
    """The descriptor of run_dir's lock file, locked by this process (or a UserError naming the
    holder). A lock file that a releasing process unlinked between our open and our flock is not
    the folder's lock any more: open it again."""
    for _ in range(100):
        try:
            if not run_dir.is_dir():
                run_dir.mkdir(parents=True)
                _created.add(key)
            fd, made = _open(run_dir / LOCK)
        except FileExistsError:
            if run_dir.is_dir():
                continue  # made by a process racing us: its lock decides
            raise UserError(f"{run_dir}: exists and is not a folder; pass another --out") from None
        except OSError as e:
            raise UserError(f"{e.filename or run_dir}: cannot write in the run folder ({e.strerror}); fix its "
                            "permissions or pass another --out") from None
        pid = _try_lock(fd)
        if pid is not None:
            os.close(fd)
            _created.discard(key)
            _refuse(run_dir, pid)
        if made:
            _made.add(key)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(run_dir / LOCK, follow_symlinks=False))
        except OSError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise UserError(f"{run_dir}: its lock file keeps changing; another process is starting and stopping "
                    "in this run folder: pass another --out")


def _open(path: Path) -> tuple[int, bool]:
    """(descriptor, whether this call created the file): create-exclusive first, so that a lock
    file steadytune made can be told from one that was there."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW), False


def release(run_dir: Path) -> None:
    """Drop this process's lock on run_dir, leaving the folder as claim found it: the lock file
    is removed if claim created it, and the folder too if claim created it and it holds nothing
    else. Removed while still locked, so a process that opened the file meanwhile notices that
    it is no longer the folder's lock (see _lock)."""
    key = Path(run_dir).resolve()
    fd = _held.pop(key, None)
    if fd is None:
        return
    try:
        if key in _made:
            os.unlink(key / LOCK)
        if key in _created and not any(key.iterdir()):
            key.rmdir()
    except OSError:
        pass  # filled meanwhile, or not ours to remove: kept
    _made.discard(key)
    _created.discard(key)
    os.close(fd)


@contextmanager
def released_on_error():
    """Around a run's setup: on any failure, the locks taken inside are released (and a folder
    they created, still empty, removed), so a failed start in a notebook does not hold the folder."""
    before = set(_held)
    try:
        yield
    except BaseException:
        for key in set(_held) - before:
            release(key)
        raise


def _release_all() -> None:
    """At exit (a failed setup included): every lock this process holds, released."""
    for key in list(_held):
        release(key)


def check_new(run_dir: Path) -> None:
    """A new run may start in run_dir: lock it first (rank 0; the lock is kept), then refuse a
    folder holding a run. Checked under the lock, so two starts on one folder cannot both pass."""
    run_dir = Path(run_dir)
    claim(run_dir)  # other ranks: rank 0 holds the lock
    if (run_dir / "checkpoints").exists() or (run_dir / "adapters").exists():
        release(run_dir)
        raise UserError(f"{run_dir}: already holds a run; continue it with --resume, or pass "
                        "another --out (nothing was changed)")


def config_path(run_dir: Path) -> Path:
    """Where this run's resolved config goes: config.yaml, unless the user's own config.yaml is
    there (no steadytune header): then steadytune-config.yaml, and the user's file stays as it is."""
    p = Path(run_dir) / "config.yaml"
    if (Path(run_dir) / OWN_CONFIG).exists():
        return Path(run_dir) / OWN_CONFIG
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except FileNotFoundError:
        return p
    except OSError:
        return Path(run_dir) / OWN_CONFIG
    return p if first == CONFIG_HEADER else Path(run_dir) / OWN_CONFIG


def start(cfg, run_dir: Path, resuming: bool) -> Path:
    """Claim the folder; for a new run, set aside the metrics of an earlier attempt that left no
    checkpoint (metrics.jsonl -> metrics-N.jsonl: never appended to, never lost); write the
    resolved config (config_path). Returns the config's path."""
    run_dir = Path(run_dir)
    claim(run_dir)
    try:
        metrics = run_dir / "metrics.jsonl"
        if not resuming and metrics.exists():
            n = 1
            while (run_dir / f"metrics-{n}.jsonl").exists():
                n += 1
            os.rename(metrics, run_dir / f"metrics-{n}.jsonl")
            print(f"note: {metrics} of an earlier attempt without checkpoints was renamed metrics-{n}.jsonl")
        path = config_path(run_dir)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(CONFIG_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"{e.filename or run_dir}: cannot write in the run folder ({e.strerror}); free disk "
                        "space or fix permissions") from None
    return path
