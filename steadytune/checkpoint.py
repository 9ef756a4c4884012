"""Checkpoints that survive anything: crash, SIGKILL, power loss, a full disk, a flipped bit.

A checkpoint is a folder written under a temporary name, every file flushed and fsynced, a
COMPLETE marker written last (it holds the sha256 of every file), then renamed into place (rename
is atomic on POSIX). A folder without the marker is never used. Replacing a folder (best/,
adapters/) takes two renames, final -> .NAME.old-PID, then .NAME.tmp-PID -> final; a kill between
them leaves a complete copy under a temporary name, which `recover` puts back at the next start.
Every folder written here holds OURS (written first, before anything else): only a folder holding
it is ever removed or renamed by a repair, so a user's `.photos.old-2024` beside a run is never
touched.

On load a checkpoint is verified before anything is taken from it: the files' hashes, state.json's
fields, the tensors' names, shapes and dtypes against the model and optimizer, and finite values.
A damaged newest checkpoint falls back to the one before it (`load_good`). Non-finite weights are
never written, and pruning never removes the newest checkpoint known to be sound.

Layout of RUN/checkpoints/step-0000123/:
  adapters.safetensors, adapter_config.json   LoRA weights (loadable by mlx-lm as they are)
  optimizer.safetensors                       AdamW moments and step
  state.json                                  step, epoch, position, RNG states, hashes, config
  COMPLETE                                    written last: {"sha256": {file: hash}}
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError
from .faults import crash as _crash_hook  # noqa: F401  (fault injection lives in faults.py)

MARKER = "COMPLETE"
OURS = ".steadytune-folder.json"  # in every folder atomic_folder writes: steadytune may remove its copies
PREFIX = "step-"
# Counters of state.json the trainer restores; each must be a whole number >= 0.
STATE_COUNTERS = ("step", "epoch", "pos", "bad_evals", "nonfinite")  # resume.TrainState's counters
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(-\d+)?$")
_sound: set[Path] = set()  # folders this process wrote and hashed from disk: known sound


class WriteError(UserError):
    """A folder could not be written; `reason` is the OS's word for why (disk full, permission)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Damaged(Exception):
    """A checkpoint that fails verification; the message says what is wrong, in a few words."""


# --------------------------------------------------------------------------- writing

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# safetensors' names of MLX's dtypes; bfloat16 leaves the device as its bits (numpy has no bfloat16)
_ST_DTYPE = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.float64: "F64", mx.int8: "I8",
             mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.uint8: "U8", mx.uint16: "U16",
             mx.uint32: "U32", mx.uint64: "U64", mx.bool_: "BOOL"}


def host_tensors(arrays: dict, what: str | None = None) -> dict:
    """name -> (safetensors dtype, a host copy of its values), in name order: what a file is
    written from. Copied here, on the caller's thread, so that the writing itself touches no MLX
    array (Writer). With `what`, NaN or inf is refused first (_refuse_nonfinite).

    One copy per dtype: the arrays are concatenated on the device and that one buffer is read.
    Why: on CUDA reading an array moves its buffer into unified memory (a managed allocation and
    a copy each); a 7B model's ~1,350 adapter and AdamW arrays read one by one took 0.29 s, and
    the step after each checkpoint then read its parameters back from unified memory. The
    concatenation holds one more copy on the device while it is read (0.34 GB for those AdamW
    moments), at a moment without activations."""
    keys = sorted(arrays)
    groups: dict = {}
    for k in keys:
        groups.setdefault(arrays[k].dtype, []).append(k)
    # an empty array joins every group so that even a lone array is copied, not moved
    flats = {d: mx.concatenate([arrays[k].reshape(-1) for k in ks] + [mx.zeros((0,), d)])
             for d, ks in groups.items()}
    if what is not None:
        finite = [mx.all(mx.isfinite(f)) for d, f in flats.items() if mx.issubdtype(d, mx.floating)]
        if finite and not mx.all(mx.stack(finite)).item():
            _refuse_nonfinite(arrays, what)  # which ones, and whether they count (learning_rate)
    out = {}
    for d, ks in groups.items():
        flat = np.array(mx.view(flats.pop(d), mx.uint16) if d == mx.bfloat16 else flats.pop(d))
        offset = 0
        for k in ks:
            a = arrays[k]
            out[k] = (_ST_DTYPE[d], flat[offset:offset + a.size].reshape(a.shape))
            offset += a.size
    return {k: out[k] for k in keys}


def _write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file (readable by mx.load, mlx-lm and the safetensors package) from
    host_tensors(), flushed and fsynced; a failed write is an OSError naming the file."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for k, (dtype, a) in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as the format recommends
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for _, a in tensors.values():
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk raises from write() without the file's name
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None


class Writer:
    """Writes checkpoints on a thread of its own, in the order given, while training goes on.
    Why: a 7B model's adapters and AdamW moments are 0.5 GB; writing, fsyncing and hashing them
    held the GPU idle for a second or more at every checkpoint. The values are copied to host
    memory before a job is queued (host_tensors), so the thread never touches an MLX array, and a
    checkpoint's jobs (its folder, then best/, then pruning) run one after another. A new
    checkpoint first waits for the previous one: at most one is in host memory. A failure is
    raised on the training thread at its next call (check, wait, submit); the jobs queued after
    it are dropped, and every folder written before it is intact."""

    def __init__(self):
        self._jobs: list = []
        self._error: BaseException | None = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, job) -> None:
        self.check()
        with self._lock:
            self._jobs.append(job)
            if self._thread is None:  # not a daemon: a checkpoint being written is finished at exit
                self._thread = threading.Thread(target=self._work, name="steadytune-checkpoints")
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._thread = None
                    self._lock.notify_all()
                    return
                job = self._jobs[0]
            try:
                job()
            except BaseException as e:  # noqa: BLE001  (re-raised on the training thread)
                with self._lock:
                    self._error = e
                    del self._jobs[1:]  # best/ or pruning after a failed checkpoint: not done
            with self._lock:
                self._jobs.pop(0)

    def wait(self, raise_error: bool = True) -> None:
        """Until every queued job is done; then raise a failure (unless told not to: the caller
        is already raising)."""
        with self._lock:
            while self._thread is not None:
                self._lock.wait()
        if raise_error:
            self.check()

    def check(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e


def ours(folder: Path) -> bool:
    """Whether steadytune wrote `folder` (it holds OURS naming steadytune): the only folders a
    repair or a prune may remove."""
    try:
        mark = json.loads((Path(folder) / OURS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and mark.get("written_by") == "steadytune"


def ours_or_empty(folder: Path) -> bool:
    """ours(), or a folder holding nothing but (part of) the mark: a write killed between making
    its temporary folder and marking it. Only folders named like steadytune's temporary copies
    are asked; an empty one holds nothing of anybody's."""
    try:
        return ours(folder) or not [e for e in os.listdir(folder) if e != OURS]
    except OSError:
        return False


def mark(folder: Path, name: str) -> None:
    """Write OURS into `folder`: steadytune made it and may remove it."""
    _write_bytes(folder / OURS, json.dumps({"written_by": "steadytune", "folder": name, "purpose":
                                            "written atomically; steadytune removes its .tmp-/.old- copies"}).encode())


def _unused(parent: Path, name: str, kind: str) -> Path:
    """.NAME.KIND-PID, or .NAME.KIND-PID-N when a folder not ours has that name (never touched)."""
    base = f".{name}.{kind}-{os.getpid()}"
    for n in range(1000):
        p = parent / (base if n == 0 else f"{base}-{n}")
        if not p.exists() and not p.is_symlink():
            return p
        if kind == "tmp" and n == 0 and p.is_dir() and not p.is_symlink() and ours(p):  # this pid's own leftover
            shutil.rmtree(p)
            return p
    raise OSError(errno.EEXIST, "too many folders named like steadytune's temporary copies", str(parent / base))


def atomic_folder(final: Path, write_files, hashes: dict | None = None) -> Path:
    """Write a folder atomically: write_files(tmp) fills a temporary folder, then COMPLETE (the
    files' hashes, read back from disk, or `hashes` where the files are links to files already
    hashed) is written and the folder renamed into place, replacing an older one only after the
    new one is complete. On any failure the previous folder is untouched and the message says
    what failed. A kill between the two renames of a replacement leaves the new copy complete
    under its temporary name: `recover` finishes the swap."""
    final = Path(final)
    tmp = old = None
    made = False
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _unused(final.parent, final.name, "tmp")
        old = _unused(final.parent, final.name, "old")
        tmp.mkdir()
        made = True
        _crash_hook("folder-made")
        mark(tmp, final.name)
        write_files(tmp)
        _crash_hook("before-marker")
        if hashes is None:
            hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != OURS}
        _write_bytes(tmp / MARKER, json.dumps({"sha256": hashes}, indent=1).encode())
        _fsync_dir(tmp)
        if final.exists():
            os.rename(final, old)
            _crash_hook("between-renames")
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.rename(old, final)
        reason = e.strerror or str(e)
        raise WriteError(f"{e.filename or final}: could not write {final.name} ({reason}); the previous "
                         "copy is intact. Free disk space or fix permissions, then resume with --resume",
                         reason) from None
    _sound.add(final.resolve())
    _crash_hook("after-swap")
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def _nonfinite(arrays: dict) -> list[str]:
    """Names of the float arrays holding NaN or inf. The optimizer's learning_rate is a setting,
    not a state: the schedule sets it before every step. One read from the device for all of
    them: a 7B model's adapters and AdamW moments are ~1,350 arrays, and a read each (a device
    synchronization on a GPU) made every checkpoint wait on the host."""
    names = [k for k, v in arrays.items() if k != "learning_rate" and mx.issubdtype(v.dtype, mx.floating)]
    if not names:
        return []
    finite = mx.stack([mx.all(mx.isfinite(arrays[k])) for k in names])
    if mx.all(finite).item():
        return []
    return [k for k, ok in zip(names, finite.tolist()) if not ok]


ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")  # what mlx-lm's --adapter-path reads


def _adapter_files(folder: Path, weights: dict, adapter_config: dict) -> None:
    _write_safetensors(folder / "adapters.safetensors", weights)
    _crash_hook("between-files")
    _write_bytes(folder / "adapter_config.json", json.dumps(adapter_config, indent=2).encode())


def _refuse_nonfinite(arrays: dict, what: str) -> None:
    bad = _nonfinite(arrays)
    if bad:
        raise UserError(f"{what}: {bad[0]} holds NaN or inf ({len(bad)} tensors in all); not saved, so the "
                        "last good checkpoint stays the newest. Lower --learning-rate or use --dtype float32")


def save_final_adapters(run_dir: Path, model, adapter_config: dict, same_as: Path | None = None) -> Path:
    """RUN/adapters/ (linked to the complete checkpoint `same_as` when that holds the same
    adapters); if that cannot be written (disk full, permissions), the adapters go to a folder in
    the system's temporary directory instead and the error says where: a finished run's training
    is never dropped."""
    if same_as is not None:  # the last checkpoint holds these very adapters: share its files
        try:
            return linked_copy(same_as, Path(run_dir) / "adapters", ADAPTER_FILES)
        except (WriteError, OSError, KeyError, ValueError):
            pass  # written from the model below, with its own fallback
    weights = host_tensors(dict(tree_flatten(model.trainable_parameters())), f"{run_dir}/adapters")
    write = lambda d: _adapter_files(d, weights, adapter_config)  # noqa: E731
    try:
        return atomic_folder(Path(run_dir) / "adapters", write)
    except WriteError as e:
        spare = Path(tempfile.gettempdir()) / f"steadytune-adapters-{Path(run_dir).resolve().name}-{os.getpid()}"
        try:
            atomic_folder(spare, write)
        except WriteError:
            raise UserError(f"{Path(run_dir) / 'adapters'}: could not write the final adapters ({e.reason}), "
                            f"nor to {spare}; free disk space and resume with --resume from the last "
                            "checkpoint") from None
        raise UserError(f"{Path(run_dir) / 'adapters'}: could not write the final adapters ({e.reason}); they "
                        f"were saved to {spare} instead: move that folder to {Path(run_dir) / 'adapters'} "
                        "once there is space") from None


def save(run_dir: Path, step: int, model, optimizer, adapter_config: dict, state: dict,
         name: str | None = None, writer: Writer | None = None) -> Path:
    """Write checkpoint `step` (into checkpoints/NAME, default step-0000123), or queue it on
    `writer` (its files are then complete once the writer says so). `state` is JSON-able
    (resume.snapshot). Non-finite weights are refused, here, before anything is queued."""
    if writer is not None:
        writer.wait()  # the previous checkpoint first: one copy in host memory at a time
    state = dict(state, step=step)
    weights = dict(tree_flatten(model.trainable_parameters()))
    opt = dict(tree_flatten(optimizer.state))
    folder = Path(run_dir) / "checkpoints" / (name or f"{PREFIX}{step:07d}")
    weights = host_tensors(weights, f"{folder} (step {step})")
    opt = host_tensors(opt, f"{folder} (step {step}, optimizer state)")

    def files(d: Path):
        _adapter_files(d, weights, adapter_config)
        _write_safetensors(d / "optimizer.safetensors", opt)
        _write_bytes(d / "state.json", json.dumps(state, indent=2).encode())

    if writer is None:
        return atomic_folder(folder, files)
    writer.submit(lambda: atomic_folder(folder, files))
    return folder


def save_as(ckpt: Path, name: str) -> Path:
    """checkpoints/NAME (the best checkpoint) as a copy of the complete checkpoint `ckpt`
    (linked_copy). Why: the best checkpoint is written right after the step's own, with the same
    contents; writing and hashing them again took seconds a validation on a 7B model (0.5 GB of
    adapters and AdamW moments)."""
    return linked_copy(Path(ckpt), Path(ckpt).parent / name)


def linked_copy(src: Path, final: Path, names=None) -> Path:
    """`final` as a copy of files `names` (default: all) of the complete folder `src`, its files
    hard links to `src`'s (checkpoint files are never written in place, so two folders can share
    them; a copy where the file system has no links) and its hashes `src`'s, written atomically
    like any checkpoint."""
    hashes = json.loads((Path(src) / MARKER).read_text())["sha256"]
    if names is not None:
        hashes = {f: hashes[f] for f in names}

    def files(d: Path):
        for f in hashes:
            try:
                os.link(Path(src) / f, d / f)
            except OSError:
                shutil.copy2(Path(src) / f, d / f)

    return atomic_folder(final, files, hashes)


# --------------------------------------------------------------------------- finding and repairing

def list_checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints oldest first, incomplete folders)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return [], []
    good, bad = [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith(PREFIX) and p.is_dir():
            (good if is_complete(p) else bad).append(p)
        elif _TEMP.match(p.name) and ".tmp-" in p.name and p.is_dir() and ours_or_empty(p) and not is_complete(p):
            bad.append(p)  # a write that never finished
    return good, bad


def latest(run_dir: Path) -> tuple[Path | None, list[Path]]:
    good, bad = list_checkpoints(run_dir)
    return (good[-1] if good else None), bad


def repair(parent: Path) -> list[str]:
    """Finish or undo interrupted writes among `parent`'s folders (call with the run folder
    locked: nothing else writes there). For each NAME with .NAME.tmp-PID / .NAME.old-PID
    leftovers steadytune wrote (holding OURS; any other folder is the user's and left alone): if
    NAME is missing, the newest complete copy becomes NAME (a finished new copy before the old
    one: the swap was cut between its renames); then every leftover is removed. Returns one
    note per thing done."""
    parent, notes, groups = Path(parent), [], {}
    if not parent.is_dir():
        return notes
    for p in parent.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and ours_or_empty(p):
            groups.setdefault(m["name"], []).append((m["kind"], p))
    for name, items in sorted(groups.items()):
        final = parent / name
        if not final.exists():
            complete = sorted(((kind == "tmp", p.stat().st_mtime_ns, p) for kind, p in items if is_complete(p)))
            if complete:
                os.rename(complete[-1][2], final)
                _fsync_dir(parent)
                notes.append(f"note: restored {final} from {complete[-1][2].name} (its replacement was interrupted)")
        for kind, p in items:
            if p.exists():
                if kind == "tmp" and not is_complete(p):
                    notes.append(f"note: {p} is incomplete (interrupted while writing) and is skipped; removed")
                shutil.rmtree(p, ignore_errors=True)
    return notes


def recover(run_dir: Path) -> list[str]:
    """repair() the run folder (adapters/) and its checkpoints/ (step-*, best/)."""
    return repair(Path(run_dir)) + repair(Path(run_dir) / "checkpoints")


# --------------------------------------------------------------------------- verifying and loading

def _manifest(ckpt: Path) -> dict | None:
    """{file: sha256} from COMPLETE; None for a checkpoint written before hashes ("ok")."""
    try:
        m = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m.get("sha256") if isinstance(m, dict) and isinstance(m.get("sha256"), dict) else None


def check_hashes(ckpt: Path) -> None:
    """Raise Damaged if a file differs from the hash written with the checkpoint."""
    hashes = _manifest(Path(ckpt))
    if hashes is None:
        return
    for name in ("adapters.safetensors", "optimizer.safetensors", "state.json"):
        if name not in hashes and (ckpt / name).exists():
            raise Damaged(f"COMPLETE lists no hash for {name}")
    for name, want in hashes.items():
        f = Path(ckpt) / name
        if not f.is_file():
            raise Damaged(f"{name} is missing")
        if sha256_file(f) != want:
            raise Damaged(f"{name} does not match the hash written with the checkpoint: changed or "
                          "corrupted since")


def check_state(state, folder: str) -> None:
    """state.json's fields the trainer restores: present, of the right type and range."""
    from .config import excerpt

    if not isinstance(state, dict):
        raise Damaged(f"state.json holds {type(state).__name__}, not an object")
    for k in STATE_COUNTERS:
        if k not in state:
            raise Damaged(f"state.json has no '{k}'")
        v = state[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise Damaged(f"state.json: '{k}' must be a whole number of 0 or more, got {excerpt(v)}")
    b = state.get("best_val_loss")
    if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not np.isfinite(b)):
        raise Damaged(f"state.json: 'best_val_loss' must be a finite number or null, got {excerpt(b)}")
    for k in ("config", "fingerprints", "adapter_config"):
        if k in state and not isinstance(state[k], dict):
            raise Damaged(f"state.json: '{k}' must be an object, got {type(state[k]).__name__}")
    if folder.startswith(PREFIX) and folder[len(PREFIX):].isdigit() and state["step"] != int(folder[len(PREFIX):]):
        raise Damaged(f"state.json says step {state['step']}, the folder's name step {int(folder[len(PREFIX):])}")


def check_arrays(file: str, got: dict, want: dict) -> None:
    """Tensor names, shapes and dtypes as expected, values finite."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        parts = ([f"{len(missing)} missing ({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''})"]
                 if missing else []) + \
                ([f"{len(extra)} unexpected ({', '.join(extra[:2])}{', ...' if len(extra) > 2 else ''})"]
                 if extra else [])
        raise Damaged(f"{file}: tensors do not match the model: {'; '.join(parts)}")
    for k, v in want.items():
        if got[k].shape != v.shape or got[k].dtype != v.dtype:
            raise Damaged(f"{file}: {k} is {got[k].dtype} {tuple(got[k].shape)}, the model needs "
                          f"{v.dtype} {tuple(v.shape)}")
    bad = _nonfinite(got)
    if bad:
        raise Damaged(f"{file}: {bad[0]} holds NaN or inf")


def verify(ckpt: Path, model, optimizer, same_run=None) -> tuple[dict, dict, dict]:
    """(state, adapter arrays, optimizer arrays) of a sound checkpoint, or raise Damaged.
    same_run(state, ckpt), if given, runs before the tensors are checked against the model: a
    resume with another LoRA shape is then refused as a different run (a UserError), not
    mistaken for damage."""
    ckpt = Path(ckpt)
    check_hashes(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise Damaged(f"state.json: {' '.join(str(e).split())[:120]}") from None
    check_state(state, ckpt.name)
    if same_run is not None:
        same_run(state, ckpt)
    arrays = []
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        try:
            arrays.append(mx.load(str(ckpt / name)))
        except (OSError, ValueError, RuntimeError) as e:
            raise Damaged(f"{name}: {' '.join(str(e).split())[:120]}") from None
    check_arrays("adapters.safetensors", arrays[0], dict(tree_flatten(model.trainable_parameters())))
    check_arrays("optimizer.safetensors", arrays[1], dict(tree_flatten(optimizer.state)))
    return state, arrays[0], arrays[1]


def _apply(model, optimizer, weights: dict, opt: dict) -> None:
    model.load_weights(list(weights.items()), strict=False)  # names checked: the base weights are not in the file
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(model.parameters(), optimizer.state)


def load(ckpt: Path, model, optimizer) -> dict:
    """Verify, then restore adapters and optimizer state; return state.json. (MLX's random state
    needs no restoring: the trainer reseeds it from (seed, step) before every step.)"""
    try:
        state, weights, opt = verify(ckpt, model, optimizer)
    except Damaged as e:
        raise UserError(f"{ckpt}: checkpoint is unreadable ({e}); delete this folder to resume from "
                        "the one before it") from None
    _apply(model, optimizer, weights, opt)
    return state


def load_good(ckpt: Path, model, optimizer, same_run=None) -> tuple[dict, Path]:
    """load() the newest sound checkpoint from `ckpt` back: a damaged one is skipped with a
    one-line notice and left in place. Returns (state, the checkpoint used)."""
    ckpt = Path(ckpt)
    good, _ = list_checkpoints(ckpt.parent.parent)
    older = [p for p in reversed(good) if p.name < ckpt.name]
    skipped = []
    for p in [ckpt] + older:
        try:
            state, weights, opt = verify(p, model, optimizer, same_run)
        except Damaged as e:
            skipped.append((p, str(e)))
            continue
        _apply(model, optimizer, weights, opt)
        if skipped:
            more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
            print(f"note: {skipped[0][0]} is damaged ({skipped[0][1]}){more}; resuming from {p}, "
                  "the newest sound checkpoint (the damaged ones are kept)")
        return state, p
    p, why = skipped[0]
    raise UserError(f"{p}: checkpoint is unreadable ({why}) and no earlier checkpoint is sound; start a "
                    "new run with another --out (the damaged checkpoints are kept)")


def sound(ckpt: Path) -> bool:
    """Whether a complete checkpoint's files match their hashes and state.json reads (no model
    needed); folders this process wrote are known sound without reading them again."""
    if Path(ckpt).resolve() in _sound:
        return True
    try:
        check_hashes(ckpt)
        check_state(json.loads((Path(ckpt) / "state.json").read_text()), Path(ckpt).name)
    except (Damaged, OSError, ValueError):
        return False
    return True


def prune(run_dir: Path, keep_last: int, protect: set[str] = frozenset()) -> None:
    """Keep the newest `keep_last` complete checkpoints (and `protect`ed ones, and always the
    newest sound one, should the newer ones be damaged); remove the rest and leftovers of
    interrupted writes. Only folders steadytune wrote (holding OURS or COMPLETE) are removed."""
    good, bad = list_checkpoints(run_dir)
    keep = set(good[-keep_last:]) if keep_last else set()
    for p in reversed(good):
        if sound(p):
            keep.add(p)
            break
    for p in good:
        if p not in keep and p.name not in protect and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    for p in bad:
        if ours_or_empty(p) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
