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
import tempfile
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


def _write_safetensors(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    except RuntimeError as e:  # MLX reports a failed write (a full disk too) as RuntimeError
        raise OSError(*_why_write_failed(e, path, sum(a.nbytes for a in arrays.values())), str(path)) from None
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _why_write_failed(e: RuntimeError, path: Path, nbytes: int) -> tuple[int, str]:
    """(errno, strerror) for MLX's RuntimeError: ENOSPC when the disk has less room than the file
    needed (MLX's message does not say), else its own words."""
    try:
        full = shutil.disk_usage(path.parent).free < nbytes
    except OSError:
        full = False
    if full:
        return errno.ENOSPC, os.strerror(errno.ENOSPC)
    return errno.EIO, " ".join(str(e).split())[:200] or "write failed"


def ours(folder: Path) -> bool:
    """Whether steadytune wrote `folder` (it holds OURS naming steadytune): the only folders a
    repair or a prune may remove."""
    try:
        mark = json.loads((Path(folder) / OURS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and mark.get("written_by") == "steadytune"


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


def _adapter_files(folder: Path, weights: dict, adapter_config: dict) -> None:
    _write_safetensors(folder / "adapters.safetensors", weights)
    _crash_hook("between-files")
    _write_bytes(folder / "adapter_config.json", json.dumps(adapter_config, indent=2).encode())


def write_adapters(folder: Path, model, adapter_config: dict) -> None:
    _adapter_files(folder, dict(tree_flatten(model.trainable_parameters())), adapter_config)


def _refuse_nonfinite(arrays: dict, what: str) -> None:
    bad = _nonfinite(arrays)
    if bad:
        raise UserError(f"{what}: {bad[0]} holds NaN or inf ({len(bad)} tensors in all); not saved, so the "
                        "last good checkpoint stays the newest. Lower --learning-rate or use --dtype float32")


def save_final_adapters(run_dir: Path, model, adapter_config: dict) -> Path:
    """RUN/adapters/; if that cannot be written (disk full, permissions), the adapters go to a
    folder in the system's temporary directory instead and the error says where: a finished
    run's training is never dropped."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    _refuse_nonfinite(weights, f"{run_dir}/adapters")
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
         name: str | None = None) -> Path:
    """Write checkpoint `step` (into checkpoints/NAME, default step-0000123).
    `state` is JSON-able (resume.snapshot). Non-finite weights are refused."""
    state = dict(state, step=step)
    weights = dict(tree_flatten(model.trainable_parameters()))
    opt = dict(tree_flatten(optimizer.state))
    folder = Path(run_dir) / "checkpoints" / (name or f"{PREFIX}{step:07d}")
    _refuse_nonfinite(weights, f"{folder} (step {step})")
    _refuse_nonfinite(opt, f"{folder} (step {step}, optimizer state)")

    def files(d: Path):
        _adapter_files(d, weights, adapter_config)
        _write_safetensors(d / "optimizer.safetensors", opt)
        _write_bytes(d / "state.json", json.dumps(state, indent=2).encode())

    return atomic_folder(folder, files)


def save_as(ckpt: Path, name: str) -> Path:
    """checkpoints/NAME (the best checkpoint) as a copy of the complete checkpoint `ckpt`, its
    files hard links to `ckpt`'s (checkpoint files are never written in place, so the two can
    share them; a copy where the file system has no links) and its hashes `ckpt`'s, written
    atomically like any checkpoint. Why: the best checkpoint is written right after the step's
    own, with the same contents; writing and hashing them again took seconds a validation on a
    7B model (0.5 GB of adapters and AdamW moments)."""
    ckpt = Path(ckpt)
    hashes = json.loads((ckpt / MARKER).read_text())["sha256"]

    def files(d: Path):
        for f in hashes:
            try:
                os.link(ckpt / f, d / f)
            except OSError:
                shutil.copy2(ckpt / f, d / f)

    return atomic_folder(ckpt.parent / name, files, hashes)


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
        elif _TEMP.match(p.name) and ".tmp-" in p.name and p.is_dir() and ours(p) and not is_complete(p):
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
        if m and p.is_dir() and not p.is_symlink() and ours(p):
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
        if ours(p) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
