"""Run identity: run folder names, fingerprints of data and model, and the resume compatibility check."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from .config import Config
from .errors import UserError

# Changing these makes a resumed run a different run: refused. Everything else (epochs, max_steps,
# eval/log/save frequency, patience, keep_last, learning rate) is accepted and logged.
MUST_MATCH = {
    "data": ["max_seq_length", "overlong", "train_on_prompt", "valid_fraction", "group_by_length"],
    "lora": ["rank", "alpha", "dropout", "target_modules", "num_layers"],
    "training": ["batch_size", "batch_tokens", "pack", "grad_accumulation", "seed"],
    "model": ["quantize", "group_size", "dtype"],
}


def new_run_dir(root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    i = 1
    while path.exists():
        i += 1
        path = Path(root) / f"{stamp}-{i}"
    return path


def data_fingerprint(files: dict, data_cfg) -> str:
    """sha256 of the data files' bytes (they are small next to a model)."""
    h = hashlib.sha256()
    for split in sorted(files):
        h.update(split.encode())
        with open(files[split], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_fingerprint(source: str, kind: str) -> str:
    """A cheap, stable identity of the base weights: config + each weight file's name, size, and
    sha256 of its first and last MiB (hashing a 4 GB model in full would cost a minute per run)."""
    h = hashlib.sha256(kind.encode())
    p = Path(source)
    files = [p] if p.is_file() else sorted(
        [*p.glob("*.safetensors"), *p.glob("config.json")]) if p.is_dir() else []
    if not files:
        h.update(source.encode())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


def compare_for_resume(saved: dict, cfg: Config, fingerprints: dict, adapter_config: dict, where) -> None:
    """Refuse a resume whose model, data, LoRA shape or batching differ; log safe changes."""
    old = saved.get("config", {})
    new = cfg.to_dict()
    problems = []
    for kind in ("model", "data"):
        if saved.get("fingerprints", {}).get(kind) != fingerprints[kind]:
            what = "model weights" if kind == "model" else "training/validation data files"
            problems.append(f"  the {what} changed since the checkpoint")
    defaults = Config().to_dict()  # a setting newer than the checkpoint had its default then
    for sec, keys in MUST_MATCH.items():
        for k in keys:
            a, b = old.get(sec, {}).get(k, defaults[sec][k]), new[sec][k]
            if a != b:
                problems.append(f"  {sec}.{k}: {a!r} in the checkpoint, {b!r} now")
    if saved.get("adapter_config", {}).get("lora_parameters", {}).get("keys") != \
            adapter_config["lora_parameters"]["keys"]:
        problems.append("  the adapted layers differ")
    if problems:
        raise UserError(f"{where}: cannot resume: the run would not be the same run. Restore these "
                        "settings or start a new run with another --out:", problems)
    changed = [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}" for sec, vals in new.items()
               for k, v in vals.items() if sec in old and old[sec].get(k) != v and k not in ("resume", "force")]
    for c in changed:
        print(f"note: resuming with a changed setting: {c}")
