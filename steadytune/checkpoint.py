"""Checkpoints that survive anything: crash, SIGKILL, power loss, a full disk.

A checkpoint is a folder written under a temporary name, every file flushed and fsynced, a
COMPLETE marker written last, then renamed into place (rename is atomic on POSIX). A folder
without the marker is never used. The final adapters/ is written the same way.

Layout of RUN/checkpoints/step-0000123/:
  adapters.safetensors, adapter_config.json   LoRA weights (loadable by mlx-lm as they are)
  optimizer.safetensors                       AdamW moments and step
  state.json                                  step, epoch, position, RNG states, hashes, config
  COMPLETE                                    written last
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError

MARKER = "COMPLETE"
PREFIX = "step-"


_hits: dict[str, int] = {}


def _crash_hook(point: str) -> None:
    """Test hook: STEADYTUNE_TEST_CRASH=point[:n] kills the process with SIGKILL the n-th time
    (default first) it passes `point`, to prove a crash there loses nothing. Unset in normal use."""
    want = os.environ.get("STEADYTUNE_TEST_CRASH", "")
    name, _, nth = want.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        os.kill(os.getpid(), 9)


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
    mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_folder(final: Path, write_files) -> Path:
    """Write a folder atomically: write_files(tmp) fills a temporary folder, then COMPLETE is
    written and the folder renamed into place, replacing an older one only after the new one is
    complete. On any failure the previous folder is untouched and the message says what failed."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_files(tmp)
        _crash_hook("before-marker")
        _write_bytes(tmp / MARKER, b"ok\n")
        _fsync_dir(tmp)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise UserError(f"{e.filename or final}: could not write {final.name} ({e.strerror}); "
                        f"the previous copy is intact. Free disk space or fix permissions, then "
                        f"resume with --resume") from None
    shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def write_adapters(folder: Path, model, adapter_config: dict) -> None:
    weights = dict(tree_flatten(model.trainable_parameters()))
    _write_safetensors(folder / "adapters.safetensors", weights)
    _crash_hook("between-files")
    _write_bytes(folder / "adapter_config.json", json.dumps(adapter_config, indent=2).encode())


def save_final_adapters(run_dir: Path, model, adapter_config: dict) -> Path:
    return atomic_folder(run_dir / "adapters", lambda d: write_adapters(d, model, adapter_config))


def save(run_dir: Path, step: int, model, optimizer, adapter_config: dict, state: dict,
         name: str | None = None) -> Path:
    """Write checkpoint `step` (into checkpoints/NAME, default step-0000123).
    `state` is JSON-able (step, epoch, position, hashes, ...)."""
    state = dict(state, step=step, random_state=[np.asarray(s).tolist() for s in mx.random.state])

    def files(d: Path):
        write_adapters(d, model, adapter_config)
        opt = dict(tree_flatten(optimizer.state))
        _write_safetensors(d / "optimizer.safetensors", opt)
        _write_bytes(d / "state.json", json.dumps(state, indent=2).encode())

    return atomic_folder(Path(run_dir) / "checkpoints" / (name or f"{PREFIX}{step:07d}"), files)


def list_checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints oldest first, incomplete folders)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return [], []
    good, bad = [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith(PREFIX) and p.is_dir():
            (good if is_complete(p) else bad).append(p)
        elif p.name.startswith(".") and ".tmp-" in p.name:  # a write that never finished
            bad.append(p)
    return good, bad


def latest(run_dir: Path) -> tuple[Path | None, list[Path]]:
    good, bad = list_checkpoints(run_dir)
    return (good[-1] if good else None), bad


def load(ckpt: Path, model, optimizer) -> dict:
    """Restore adapters and optimizer state; return state.json. (MLX's random state needs no
    restoring: the trainer reseeds it from (seed, step) before every step.)"""
    try:
        state = json.loads((ckpt / "state.json").read_text())
        weights = mx.load(str(ckpt / "adapters.safetensors"))
        opt = mx.load(str(ckpt / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{ckpt}: checkpoint is unreadable ({e}); delete this folder to resume "
                        "from the one before it") from None
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


def prune(run_dir: Path, keep_last: int, protect: set[str] = frozenset()) -> None:
    """Keep the newest `keep_last` complete checkpoints (and `protect`ed ones); remove the rest
    and leftovers of interrupted writes."""
    good, bad = list_checkpoints(run_dir)
    for p in good[:-keep_last] if keep_last else good:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in bad:
        shutil.rmtree(p, ignore_errors=True)
