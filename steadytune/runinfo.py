"""Run identity: run folder names, fingerprints of data and model, and the resume compatibility check."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from .config import Config
from .errors import UserError

# Changing these makes a resumed run a different run: refused. Everything else (epochs, max_steps,
# eval/log/save frequency, patience, keep_last, learning rate) is accepted and logged.
MUST_MATCH = {
    "data": ["max_seq_length", "overlong", "train_on_prompt", "valid_fraction", "group_by_length",
             "max_examples", "system_fold"],
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


def data_fingerprint(contents: dict[str, bytes]) -> str:
    """sha256 of the data files' bytes, split -> bytes (they are small next to a model): the
    bytes the reader parsed (data.read_splits), so the files are not read a second time. The
    same digest as hashing the files split by split, so older checkpoints still resume."""
    h = hashlib.sha256()
    for split in sorted(contents):
        h.update(split.encode())
        h.update(contents[split])
    return h.hexdigest()[:16]


def _legacy_fingerprint(source: str, kind: str) -> str:
    """The identity checkpoints held before the full one: config + each weight file's name, size
    and sha256 of its first and last MiB. Kept to compare against such checkpoints."""
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


# What changes the meaning of a token or what the model computes, by the name a message gives it.
# tokenizer_config.json is split by key: its chat_template, its special tokens, the rest.
_MODEL_FILES = {
    "weights": ["*.safetensors", "model.safetensors.index.json"],
    "model config": ["config.json"],
    "tokenizer vocabulary": ["tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                             "spiece.model"],
    "special tokens": ["special_tokens_map.json", "added_tokens.json"],
    "chat template": ["chat_template.jinja", "chat_template.json"],
    "generation config": ["generation_config.json"],
}
_SPECIAL_KEYS = ("added_tokens_decoder", "additional_special_tokens")


def cache_dir() -> Path:
    """steadytune's one cache folder (weight hashes, the CPU decoder library): $STEADYTUNE_CACHE_DIR,
    else $XDG_CACHE_HOME/steadytune, else ~/.cache/steadytune. The older name STEADYTUNE_CACHE is
    still read, with a note saying to rename it."""
    old = os.environ.get("STEADYTUNE_CACHE")
    if old and old not in _noted:
        _noted.add(old)
        print("note: STEADYTUNE_CACHE is deprecated; name the cache folder with STEADYTUNE_CACHE_DIR"
              + (" (set too: it wins)" if os.environ.get("STEADYTUNE_CACHE_DIR") else ""), file=sys.stderr)
    chosen = os.environ.get("STEADYTUNE_CACHE_DIR") or old
    if chosen:
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "steadytune"


_noted: set[str] = set()  # deprecated values already noted once


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached by (resolved path, size, mtime, inode) in
    cache_dir()/file-hashes.json: a 7B model's 14 GB are read once (~10 s), not at every start.
    A cache that cannot be read or written is ignored."""
    from .checkpoint import sha256_file

    path = Path(path).resolve()
    st = path.stat()
    if st.st_size < (1 << 20):  # small files: hashing is cheaper than the cache
        return sha256_file(path)
    key, stamp = str(path), [st.st_size, st.st_mtime_ns, st.st_ino]
    cache_file = cache_dir() / "file-hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
        assert isinstance(cache, dict)
    except (OSError, ValueError, AssertionError):
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, list) and hit[:3] == stamp and len(hit) == 4:
        return hit[3]
    digest = sha256_file(path)
    cache[key] = stamp + [digest]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".file-hashes.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)  # atomic: a concurrent reader sees the old or the new cache
    except OSError:
        pass
    return digest


def model_fingerprint(source: str, kind: str) -> dict:
    """The base model's identity, part by part ({part: sha256[:16]}, parts named as a message
    says them): every byte of the weights (hashes cached, see file_sha256), config.json,
    tokenizer vocabulary, special tokens, chat template, generation config. A GGUF file holds all
    of them: its whole-file hash is one part. "legacy" is the older, partial identity (only
    compared against checkpoints that hold nothing else)."""
    p = Path(source)
    parts = {"legacy": _legacy_fingerprint(source, kind)}
    if p.is_file():
        parts["GGUF file"] = file_sha256(p)[:16]
        return parts
    if not p.is_dir():
        parts["source"] = hashlib.sha256(f"{kind}:{source}".encode()).hexdigest()[:16]
        return parts
    for part, patterns in _MODEL_FILES.items():
        h = hashlib.sha256()
        for f in sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()}):
            h.update(f"{f.name}:{file_sha256(f)}\n".encode())
        parts[part] = h.hexdigest()[:16]
    tc = p / "tokenizer_config.json"
    try:
        conf = json.loads(tc.read_text()) if tc.is_file() else {}
    except (OSError, ValueError):
        conf = {"unreadable": tc.read_bytes().hex() if tc.is_file() else ""}
    conf = conf if isinstance(conf, dict) else {"not an object": conf}
    pieces = {"chat template": {k: v for k, v in conf.items() if k == "chat_template"},
              "special tokens": {k: v for k, v in conf.items() if k.endswith("_token") or k in _SPECIAL_KEYS},
              "tokenizer config": {}}
    pieces["tokenizer config"] = {k: v for k, v in conf.items()
                                  if k not in pieces["chat template"] and k not in pieces["special tokens"]}
    for part, values in pieces.items():
        h = hashlib.sha256(parts.get(part, "").encode())
        h.update(json.dumps(values, sort_keys=True, default=str).encode())
        parts[part] = h.hexdigest()[:16]
    return parts


def model_changes(old, new: dict) -> list[str]:
    """What differs between two model identities, by part name (a checkpoint from before the
    full identity holds only the legacy string)."""
    if isinstance(old, str) or old is None:
        return [] if old == new.get("legacy") else ["weights or config.json"]
    return [part for part in new if part != "legacy" and old.get(part) != new[part]] + \
        [part for part in old if part not in new and part != "legacy"]


def compare_for_resume(saved: dict, cfg: Config, fingerprints: dict, adapter_config: dict, where) -> None:
    """Refuse a resume whose model, data, LoRA shape, batching or objective (method, beta,
    reference, GRPO's sampling and rewards) differ; log safe changes."""
    from .objectives import objective_of

    old = saved.get("config", {})
    new = cfg.to_dict()
    problems = []
    before = saved.get("fingerprints", {})
    for part in model_changes(before.get("model"), fingerprints["model"]):
        problems.append(f"  the model's {part} changed since the checkpoint")
    if before.get("data") != fingerprints["data"]:
        problems.append("  the training/validation data files changed since the checkpoint")
    defaults = Config().to_dict()  # a setting newer than the checkpoint had its default then
    for sec, keys in MUST_MATCH.items():
        for k in keys:
            a, b = old.get(sec, {}).get(k, defaults[sec][k]), new[sec][k]
            if a != b:
                problems.append(f"  {sec}.{k}: {a!r} in the checkpoint, {b!r} now")
    # The objective: a checkpoint and best/ are judged by it, so none of it may change on resume
    # (objectives.Objective.resume_keys: beta means nothing to sft, so it is compared where it counts).
    method = old.get("training", {}).get("method", defaults["training"]["method"])
    for sec, keys in objective_of(method).resume_keys.items():
        for k in keys:
            a, b = old.get(sec, {}).get(k, defaults[sec][k]), new[sec][k]
            if a != b:
                problems.append(f"  {sec}.{k}: {a!r} in the checkpoint, {b!r} now (the objective would change)")
    if saved.get("adapter_config", {}).get("lora_parameters", {}).get("keys") != \
            adapter_config["lora_parameters"]["keys"]:
        problems.append("  the adapted layers differ")
    if len(problems) == 1:
        raise UserError(f"{where}: cannot resume: {problems[0].strip()}; restore it, or start a new run "
                        "with another --out")
    if problems:
        raise UserError(f"{where}: cannot resume: the run would not be the same run. Restore these "
                        "settings or start a new run with another --out:", problems)
    changed = [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}" for sec, vals in new.items()
               for k, v in vals.items() if sec in old and old[sec].get(k) != v and k not in ("resume", "force")]
    for c in changed:
        print(f"note: resuming with a changed setting: {c}")
