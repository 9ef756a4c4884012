"""Training objectives: what SFT, DPO, ORPO and GRPO each supply to a run, behind one interface.

    objective = objective_of(cfg.training.method)
    splits = objective.read(cfg)                   # the data files, checked
    train, valid = objective.tokenize(cfg, splits, tokenizer)
    plan_cfg = objective.plan_config(cfg)          # the configuration the memory planner predicts
    step = objective.make_step(run)                # step(micro_batches, lr, index) -> StepResult
    loss, records = objective.validate(step, run)  # held-out score (lower is better) + its records

setup.py and the loop (trainer.py) call only these and never branch on the method. What the
objectives share stays shared: the epoch plan (batching.py), accumulation, sharding, clipping,
the flat update and the non-finite guard (step.py), checkpoints and their resume state
(resume.py). `resume_keys` are the settings ({section: keys}) a resumed run must keep: a checkpoint and
best/ are judged by the objective, so none of it may change on resume.
"""

from __future__ import annotations

import copy
from functools import partial


class Objective:
    """Supervised fine-tuning: the next-token loss on the answer tokens (the default)."""

    name = "sft"
    resume_keys: dict = {"training": ("method",)}
    what = "examples"                    # what the data holds, in messages
    merges = True                        # may run a step's micro-batches as one call (setup.merged_calls)
    packs = True                         # may lay a call's examples out in shared rows (packing.py)

    def read(self, cfg):
        """The data files' train and validation records, checked (one UserError lists them all)."""
        d, t = cfg.data, cfg.training
        return self.loader()(d.path, d.valid_fraction, t.seed, d.max_examples)

    def loader(self):
        from .data import load_splits

        return load_splits

    def tokenize(self, cfg, splits, tokenizer):
        """(train, validation) token ids and loss masks; None without a tokenizer."""
        from .data import check_template, tokenize_all, val_subset

        if tokenizer is None:
            return None
        splits.notes += check_template(splits, tokenizer, cfg.data)  # system turns folded; one file:line per failure
        tok = partial(tokenize_all, tokenizer=tokenizer, max_seq_length=cfg.data.max_seq_length,
                      overlong=cfg.data.overlong, train_on_prompt=cfg.data.train_on_prompt)
        return tok(splits.train), tok(val_subset(splits.valid, cfg.data.val_max_examples, cfg.training.seed))

    def plan_config(self, cfg):
        """The configuration the memory planner (plan.py) predicts this objective's step with."""
        return cfg

    def plan_lengths(self, cfg, data) -> list[int]:
        """Token lengths the memory planner lays the step's rows out from."""
        return data.lengths().tolist()

    def data_lengths(self, cfg) -> list[int] | None:
        """plan_lengths of cfg's training data, for `steadytune plan` (no weights loaded); None
        without data or where the tokenizer needs the weights."""
        from .plan import _tokenizer

        if not cfg.data.path or (tokenizer := _tokenizer(cfg.model.path)) is None:
            return None
        return self.plan_lengths(cfg, self.tokenize(cfg, self.read(cfg), tokenizer)[0])

    def check_memory(self, cfg, source, lengths: list) -> int:
        """Refuse what the planner predicts will not fit (setup.check_memory); returns how many
        micro-batches of a step run as one call."""
        from .setup import check_memory

        return check_memory(cfg, source, lengths, self)

    def make_step(self, run):
        from . import faults
        from .step import Step

        from .backend import device_kind
        from .batching import buckets_rows

        t = run.cfg.training
        return Step(run.model, run.optimizer, run.train_set, seed=t.seed, max_grad_norm=t.max_grad_norm,
                    pack_target=run.pack_target, merge=run.merge, ce_chunk=run.compute["ce_chunk"],
                    bucket_rows=buckets_rows(device_kind(), t.batch_tokens),
                    mask_dtype=run.mask_dtype, rank=run.rank, world=run.world, nan_at=faults.nan_steps())

    def validate(self, step, run) -> tuple[float, dict]:
        """(held-out loss, lower is better: early stopping and best/ follow it; records for the
        `val` event of metrics.jsonl)."""
        val = step.validation_loss(run.val_set, run.cfg.training.batch_size * run.merge)
        return val, {"val_loss": val}

    def describe(self, run, per_epoch: int, total: int, pad: float) -> list[str]:
        """The first lines' account of the data and of what a step holds."""
        from .trainer import batches_line

        t = run.cfg.training
        n = len(run.train_set)
        size = (f"{n / max(1, per_epoch):.1f} {self.what} on average" if t.batch_tokens
                else f"{t.batch_size * t.grad_accumulation} {self.what}")
        return [f"train: {n} {self.what}, {int(run.train_set.target_tokens().sum())} target tokens per epoch, "
                f"{per_epoch} steps per epoch of {size}, {total} steps in all; padding {pad:.1%}",
                f"valid: {len(run.val_set)} {self.what}",
                batches_line(t, run.pack_target, run.merge)]


class Pairs(Objective):
    """Preference tuning on chosen/rejected pairs: DPO or ORPO (preference.py)."""

    what = "pairs"
    merges = False

    def __init__(self, name: str):
        self.name = name
        self.resume_keys = {"training": ("method", "beta", "reference") if name == "dpo" else ("method", "beta")}

    def loader(self):
        from .pairs import load_pair_splits

        return load_pair_splits

    def tokenize(self, cfg, splits, tokenizer):
        from .pairs import tokenize_pair_splits

        return tokenize_pair_splits(cfg, splits, tokenizer)

    def plan_config(self, cfg):
        """Twice the rows (a micro-batch of B pairs is 2B sequences; packed, lengths() already
        counts both sides) and no chunked output layer (pair log-probabilities need every
        sequence's logits: preference.sequence_logps)."""
        c = copy.deepcopy(cfg)
        if not c.training.pack:
            c.training.batch_size *= 2
            c.training.batch_tokens = c.training.batch_tokens and c.training.batch_tokens * 2
        c.training.chunked_ce = "off"
        return c

    def make_step(self, run):
        """DPO's reference log-probabilities of the train and validation pairs are computed here,
        once, with the adapters switched off: in a fixed layout, so a resumed run computes the
        same bits."""
        from . import faults
        from .preference import PairStep, reference_logps

        t = run.cfg.training
        ref = self.val_ref = None
        if self.name == "dpo":
            ref = reference_logps(run.model, run.train_set, t.batch_size)
            self.val_ref = reference_logps(run.model, run.val_set, t.batch_size) if len(run.val_set) else None
        return PairStep(run.model, run.optimizer, run.train_set, ref, method=self.name, beta=t.beta,
                        seed=t.seed, max_grad_norm=t.max_grad_norm, pack_target=run.pack_target,
                        mask_dtype=run.mask_dtype, rank=run.rank, world=run.world, nan_at=faults.nan_steps())

    def validate(self, step, run):
        val, rewards = step.evaluate(run.val_set, self.val_ref, run.cfg.training.batch_size)
        return val, {"val_loss": val, **{f"val_{k}": v for k, v in rewards.items()}}


class GRPO(Objective):
    """Group relative policy optimization on prompts with verifiable rewards (grpo.py)."""

    name = "grpo"
    what = "prompts"
    merges = packs = False
    resume_keys = {"training": ("method", "beta"),
                   "grpo": ("reward", "group_size", "max_new_tokens", "temperature", "loss", "epsilon",
                            "epsilon_high")}

    def loader(self):
        from .grpo import load_prompt_splits

        return load_prompt_splits

    def tokenize(self, cfg, splits, tokenizer):
        from .data import val_subset
        from .grpo import tokenize_prompts

        if tokenizer is None:
            return None
        tok = partial(tokenize_prompts, tokenizer=tokenizer, max_seq_length=cfg.data.max_seq_length,
                      max_new_tokens=cfg.grpo.max_new_tokens)
        return tok(splits.train), tok(val_subset(splits.valid, cfg.data.val_max_examples, cfg.training.seed))

    def plan_config(self, cfg, rows: int | None = None):
        """The training pass of one call: `rows` (a group by default) rows of prompt + completion,
        unpacked, full logits (per-token log-probabilities of every row)."""
        c = copy.deepcopy(cfg)
        c.training.batch_size, c.training.grad_accumulation = rows or cfg.grpo.group_size, 1
        c.training.pack, c.training.chunked_ce = False, "off"
        return c

    def plan_lengths(self, cfg, data) -> list[int]:
        """A row is a prompt and a completion of up to max_new_tokens."""
        return [int(n) + cfg.grpo.max_new_tokens for n in data.lengths()]

    def check_memory(self, cfg, source, lengths: list) -> int:
        """Plan the two phases of a step, which never hold their buffers at once: the rollouts
        (every completion of the step decoding together: the KV cache and the last logits of
        each row; on the CPU plus the float32 copy the decoder reads) and the training pass, one
        call per group or, where a group does not fit, per the largest part of it that does.
        Returns the rows of a training call; refuses (one line, with what to lower) what fits
        neither way."""
        from .backend import limit_cache
        from .errors import UserError
        from .plan import GB, check_fits

        g = cfg.grpo.group_size
        plan = None
        for rows in [r for r in range(g, 0, -1) if g % r == 0]:
            plan = check_fits(self.plan_config(cfg, rows), data_stats=lengths, source=source, quiet=True)
            if plan is None or plan.fits:
                break
        plan = check_fits(self.plan_config(cfg, rows), data_stats=lengths, source=source)  # raises if 1 row won't fit
        if plan is None:
            return g
        if rows < g:
            print(f"note: each prompt's {g} completions train in calls of {rows} rows (what the memory plan "
                  "says fits)")
        need = rollout_bytes(plan, cfg, max(lengths, default=0))
        if need > plan.available and not cfg.training.force:
            raise UserError(f"memory: the rollouts of a step ({cfg.training.batch_size * cfg.training.grad_accumulation}"
                            f" prompts x {g} completions decoding together) are predicted to need {need / GB:.1f} GB "
                            f"but {plan.available / GB:.1f} GB is available; lower --batch-size, --grad-accumulation, "
                            "--group-size or --max-new-tokens, or pass --force to try anyway")
        self.rollout_gb = need / GB
        limit_cache(plan)
        return rows

    def make_step(self, run):
        from . import faults
        from .grpo import GRPOStep, Settings, check_rollouts
        from .rewards import load_rewards

        t = run.cfg.training
        tokenizer = run.loaded.tokenizer
        eos = set(getattr(tokenizer, "eos_token_ids", None) or []) | {tokenizer.eos_token_id} - {None}
        if run.world > 1:
            from .errors import UserError

            raise UserError("--method grpo trains in one process for now (--nproc 1): its rollouts are not "
                            "sharded across processes yet")
        check_rollouts(run.model, eos)
        step = GRPOStep(run.model, run.optimizer, run.train_set, load_rewards(run.cfg.grpo.reward),
                        Settings.of(run.cfg, run.merge), eos=eos, tokenizer=tokenizer, seed=t.seed,
                        max_grad_norm=t.max_grad_norm, nan_at=faults.nan_steps())
        return step

    def validate(self, step, run):
        return step.evaluate(run.val_set, run.cfg.training.batch_size * run.cfg.grpo.group_size)

    def describe(self, run, per_epoch: int, total: int, pad: float) -> list[str]:
        g, t = run.cfg.grpo, run.cfg.training
        prompts = t.batch_size * t.grad_accumulation
        return [f"train: {len(run.train_set)} prompts, {g.group_size} completions each of up to "
                f"{g.max_new_tokens} tokens (temperature {g.temperature}), rewards {', '.join(g.reward)}, "
                f"loss {g.loss}, beta {t.beta}; {per_epoch} steps per epoch of {prompts} prompts, {total} in all",
                f"valid: {len(run.val_set)} prompts (greedy answers, scored by the same rewards)",
                f"steps: {prompts * g.group_size} completions sampled together, then trained in calls of "
                f"{run.merge} rows (prompt + completion, padded)"]


def rollout_bytes(plan, cfg, longest: int) -> float:
    """Peak bytes while a step's completions decode (grpo.rollout): the base and adapter weights
    (the plan's), each row's KV cache (keys and values of every layer in the compute dtype, up to
    the longest prompt + max_new_tokens) and its last position's logits (float32, with the
    sampler's copy). On the CPU, plus what the decoding path holds: the compiled decoder
    (cpu_decode.MODEL_TYPES, 4- or 8-bit) a float32 copy of the scales and biases; other families
    a float32 copy of the whole base (rollout_mode)."""
    from .cpu_decode import MODEL_TYPES

    a, r = plan.arch, plan.run
    rows = cfg.training.batch_size * cfg.training.grad_accumulation * cfg.grpo.group_size
    half = 4 if r.dtype == "float32" else 2
    kv = 2 * a.layers * a.kv_heads * a.head_dim * half * rows * longest
    logits = 2 * rows * a.vocab * 4
    floats = 0.0
    bits = (a.quantization or {}).get("bits", r.bits)
    if r.device == "cpu" and bits:
        d = a.dims
        per_layer = d["hidden"] * (d["q"] + 2 * a.kv_heads * a.head_dim) + d["q"] * d["hidden"] \
            + 3 * d["hidden"] * d["inter"]
        weights = a.layers * per_layer + a.vocab * a.hidden * (1 if a.tied else 2)
        if a.model_type in MODEL_TYPES and bits in (4, 8):
            group = (a.quantization or {}).get("group_size", r.group_size)
            floats = 8 * weights / group  # a float32 scale and bias a group
        else:
            floats = 4 * weights
    b = plan.breakdown
    return b.base_weights + b.lora_weights + b.optimizer + kv + logits + floats + b.overhead


def objective_of(method: str) -> Objective:
    """The objective of `training.method` (sft, dpo, orpo, grpo)."""
    if method == "grpo":
        return GRPO()
    if method in ("dpo", "orpo"):
        return Pairs(method)
    return Objective()
