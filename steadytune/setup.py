"""Everything a run needs, built once, before the first step: `setup(cfg)` returns a `Run`.

    data files read -> model source resolved -> run folder (or the checkpoint to resume)
    -> data tokenized -> memory planned with what is now known -> model loaded, LoRA, compute
    options -> optimizer -> fingerprints -> state (fresh or restored)

Everything that can fail on bad input fails here: data validation first (cheap), then the run
folder, the memory plan, the model. Each input is read once: the model path is resolved once,
the data files read (and hashed for the fingerprint, from the bytes read) and tokenized once, a
model folder's tokenizer loaded once (to check it, then reused by load_base), and the planner is
handed the model config and the token lengths instead of reading them again. `Run.timings` holds
the seconds each part took (the `startup` record of metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from . import checkpoint as ckpt
from . import runlock
from .batching import merge_group, row_target
from .config import Config
from .data import Splits, use_chat_template
from .errors import UserError
from .objectives import Objective, objective_of
from .progress import check_sinks
from .resume import TrainState, restore
from .runinfo import model_fingerprint, new_run_dir


@dataclass
class Run:
    """What `setup` built: a plain object, read by the loop (trainer.py) and by `make_step`."""

    cfg: Config
    objective: Objective               # objectives.py: what the method supplies (data, step, validation)
    run_dir: Path
    resume_from: Path | None
    splits: Splits
    train_set: object                  # the objective's tokenized data (data.Tokenized, pairs, prompts)
    val_set: object
    loaded: object                     # model.LoadedModel: model, tokenizer, config, source, kind
    adapter_config: dict
    compute: dict                      # qlora.apply_compute's result, plus ce_chunk
    pack_target: int                   # positions per packed row (batching.pack_layout); 0: not packed
    mask_dtype: object                 # the packed attention mask's dtype (packing.prepare)
    optimizer: optim.Optimizer
    fingerprints: dict
    state: TrainState
    rank: int = 0
    world: int = 1
    timings: dict = field(default_factory=dict)
    merge: int = 1                     # micro-batches of a step run as one call (merged_calls)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model


def setup(cfg: Config, rank: int = 0, world: int = 1) -> Run:
    with runlock.released_on_error():  # a failed start holds no lock and leaves no empty run folder
        return _setup(cfg, rank, world)


def _setup(cfg: Config, rank: int, world: int) -> Run:
    from .model import apply_lora, check_source, load_base, resolve_source, source_tokenizer

    t, timings = cfg.training, {}
    tic = time.perf_counter()
    if not cfg.data.path:
        raise UserError("no training data: pass --data FILE_OR_FOLDER (JSONL with chat, "
                        "prompt/completion, text or alpaca records)")
    check_sinks(cfg.output.log_to)  # a missing wandb/mlflow package: said now, not after the model loads
    objective = objective_of(t.method)
    splits = objective.read(cfg)
    source = resolve_source(cfg.model.path)
    checked = check_source(*source)  # before the planner reads the model's files; a folder's tokenizer
    run_dir, resume_from = run_folder(cfg, world)
    tokenizer = checked if checked is not None else source_tokenizer(cfg.model.path, source)
    sets = objective.tokenize(cfg, splits, tokenizer)
    timings["data_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    merge = objective.check_memory(cfg, source, objective.plan_lengths(cfg, sets[0]) if sets else [])
    timings["plan_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    loaded = load_base(cfg.model, source, checked)  # a folder's tokenizer is not loaded again
    use_chat_template(loaded.tokenizer, cfg.data)  # --chat-template: on the tokenizer the run answers with too
    if sets is None or _eos(tokenizer) != _eos(loaded.tokenizer):  # the end-of-turn tokens decide the ids
        sets = objective.tokenize(cfg, splits, loaded.tokenizer)
    train_set, val_set = sets
    adapter_config = apply_lora(loaded.model, cfg.lora, t.seed)
    adapter_config["base_model"] = loaded.source
    compute, mask_dtype, pack_target = apply_compute_options(loaded.model, cfg, objective)
    optimizer = optim.AdamW(learning_rate=t.learning_rate, weight_decay=t.weight_decay)
    optimizer.init(loaded.model.trainable_parameters())
    timings["load_s"] = time.perf_counter() - tic
    run = Run(cfg, objective, run_dir, resume_from, splits, train_set, val_set, loaded, adapter_config, compute,
              pack_target, mask_dtype, optimizer,
              {"data": splits.fingerprint,  # hashed as the files were read: each read once
               "model": model_fingerprint(loaded.source, loaded.kind)},
              TrainState(), rank, world, timings, merge)
    if resume_from:
        restore(run, resume_from)
    if rank == 0:
        runlock.start(cfg, run_dir, resume_from is not None)  # lock; the resolved config; the user's files kept
    return run


def make_step(run: Run, optimizer=None):
    """The run's step (objectives.py), with `optimizer` instead of the run's, if given."""
    if optimizer is not None:
        run.optimizer = optimizer
    return run.objective.make_step(run)


def _eos(tokenizer) -> set:
    """End-of-sequence ids: mlx-lm's loader adds those of the model's config (and
    generation_config.json) to the tokenizer's own."""
    return set(getattr(tokenizer, "eos_token_ids", None) or []) | {getattr(tokenizer, "eos_token_id", None)}


def run_folder(cfg: Config, world: int = 1) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None); refuses to overwrite a run."""
    out, resume = cfg.output.dir, cfg.training.resume
    if resume:
        run_dir = Path(out) if out else newest_run()
        if run_dir.is_dir():
            runlock.claim(run_dir)  # one process per run folder, from here on; repairs interrupted writes
        last, incomplete = ckpt.latest(run_dir)
        for p in incomplete:
            print(f"note: {p} is incomplete (interrupted while writing) and is skipped")
        if last is None:
            runlock.release(run_dir)
            raise UserError(f"{run_dir}: no complete checkpoint to resume from; start a new run "
                            "without --resume")
        return run_dir, last
    if not out and world > 1:
        raise UserError("distributed training needs --out RUN_FOLDER (the same for every process)")
    run_dir = Path(out) if out else new_run_dir()
    runlock.check_new(run_dir)  # locked (kept until the process ends), then: holds no run
    return run_dir, None  # a failed start releases it, removing a folder it created (runlock.release)


def newest_run() -> Path:
    runs = sorted((p for p in Path("runs").glob("*") if (p / "checkpoints").is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError("--resume: no run with checkpoints under runs/; pass --out RUN_FOLDER")
    return runs[-1]


def check_memory(cfg: Config, source, lengths: list, objective: Objective | None = None) -> int:
    """Refuse a configuration the planner predicts will not fit (unless --force), planned with the
    resolved model source and the training examples' token lengths ([]: not known yet). Returns
    how many micro-batches of a step run as one call (merged_calls)."""
    from .backend import limit_cache
    from .plan import check_fits

    plan_config = (objective or objective_of(cfg.training.method)).plan_config
    plan = check_fits(plan_config(cfg), data_stats=lengths, source=source)
    merge = merged_calls(cfg, plan, lambda c: check_fits(plan_config(c), data_stats=lengths, source=source,
                                                         quiet=True))
    if merge > 1:  # plan what actually runs: the merged calls
        plan = check_fits(plan_config(merged_config(cfg, merge)), data_stats=lengths, source=source)
    limit_cache(plan)  # MLX's buffer cache kept within the plan's headroom
    return merge


def merged_calls(cfg: Config, plan, plan_of) -> int:
    """Micro-batches of a step run as one call (training.merge_micro_batches): packed runs only
    (padded rows of different widths cannot share a call), as many as the memory plan of the
    merged call (`plan_of(config)`) says fit; 1 without a plan (nothing known, nothing risked)."""
    t = cfg.training
    if not t.pack or t.grad_accumulation == 1 or t.merge_micro_batches == "off" or plan is None \
            or not objective_of(t.method).merges:
        return 1
    return merge_group(t.grad_accumulation, lambda g: (p := plan_of(merged_config(cfg, g))) is not None and p.fits)


def merged_config(cfg: Config, merge: int) -> Config:
    """`cfg` as the merged calls run it: `merge` times the rows per call, that many fewer calls."""
    t = cfg.training
    training = dataclasses.replace(t, batch_size=t.batch_size * merge,
                                   batch_tokens=t.batch_tokens * merge if t.batch_tokens else None,
                                   grad_accumulation=t.grad_accumulation // merge)
    return dataclasses.replace(cfg, training=training)


def apply_compute_options(model: nn.Module, cfg: Config, objective: Objective | None = None,
                          **compute_args) -> tuple[dict, object, int]:
    """QLoRA compute mode, loss chunking, packing's mask dtype and gradient checkpointing, as the
    trainer runs them; compute_args go to qlora.apply_compute (a bench's kernel or A/B options).
    Returns (compute dict with "ce_chunk", packed mask dtype, positions per packed row or 0 when
    the model trains unpacked)."""
    from .loss import loss_chunk
    from .qlora import apply_compute, checkpoint_blocks
    from .recurrence import install as chunked_recurrence

    chunked_recurrence()  # Gated DeltaNet layers (Qwen3-Next, Qwen3.5): the same gradients, half the memory
    compute = apply_compute(model, cfg.model.compute, **compute_args)
    compute["ce_chunk"] = loss_chunk(model, cfg.training.chunked_ce)
    mask_dtype, pack_target = mx.float32, 0
    if cfg.training.pack and (objective or objective_of(cfg.training.method)).packs:
        from .backend import device_kind
        from .batching import width_bucket
        from .packing import prepare, why_not_packable

        device = device_kind()
        widest = width_bucket(max(row_target(device), cfg.data.max_seq_length), device)  # no row is wider
        why = why_not_packable(model, widest)
        if why:  # packing is a layout: the same examples train unpacked, only slower
            print(f"note: training unpacked (one example a row): {why}")
        else:
            mask_dtype, pack_target = prepare(model), row_target(device)
    if cfg.training.grad_checkpoint:
        if whole := checkpoint_blocks(model):
            print(f"note: --grad-checkpoint leaves {len(whole)} of {len(model.layers)} blocks whole (layers "
                  f"{', '.join(map(str, whole))}: they share keys and values, which a checkpoint does not "
                  "carry); their activations are kept")
    return compute, mask_dtype, pack_target
