"""The configuration tree: the single source of truth for a run.

Defaults live here; a YAML file overrides them; CLI flags override the file. Every field has a
docstring-like `help` used by `steadytune train --help`, and a CLI flag (its name with dashes unless
`flag` says otherwise). Unknown keys are rejected with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError, collect

DEFAULT_MODEL = "smollm2-135m"
# Above 1, each Adam step moves every adapter weight by about 1 or more: not a learning rate
# anyone means (LoRA uses 1e-5..1e-2); 1e308 overflows float32 and NaNs the adapters.
MAX_LEARNING_RATE = 1.0
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32: float settings are used in float32
# Seeds feed numpy's SeedSequence and mx.random.seed(seed * 1_000_003 + step), a uint64: a 32-bit
# seed keeps that product in range for 2^32 steps; negative seeds are refused by both.
MAX_SEED = 2**32 - 1
# No count in the config means more than this; larger values are typos that overflow later
# (MLX and numpy index with int32/int64) instead of failing here.
MAX_COUNT = 2**31 - 1
# More epochs than this are a typo (planning is lazy: batching.planned_total).
MAX_EPOCHS = 1_000_000


def _f(default, help: str, flag: str | None = None, choices=None, **kw):
    meta = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    path: str = _f(DEFAULT_MODEL, "model: a folder (HF or MLX), a .gguf file, a Hugging Face Hub id, "
                   f"or '{DEFAULT_MODEL}' (the embedded default)", flag="--model")
    quantize: str = _f("4", "base weights: 4 or 8 bits (QLoRA; a quantized model is used as is), "
                       "or none (plain LoRA)", choices=["4", "8", "none"])
    group_size: int = _f(64, "quantization group size when the base is quantized on load",
                         flag="--quant-group-size", choices=[32, 64, 128])
    dtype: str = _f("auto", "compute dtype; auto = float32 on the CPU (half precision falls off the "
                    "BLAS path there), bfloat16 on a GPU (float16 for GGUF bases, whose scales are float16)",
                    flag="--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    compute: str = _f("auto", "quantized matmul: dequant (dequantize then matmul, recomputed in the "
                      "backward pass), native (quantized_matmul), auto (fastest measured per backend)",
                      choices=["auto", "dequant", "native"])


@dataclass
class DataConfig:
    path: Optional[str] = _f(None, "a JSONL/JSON file, or a folder with train.jsonl and optional "
                             "valid.jsonl, test.jsonl", flag="--data")
    max_seq_length: int = _f(2048, "longest sequence in tokens")
    overlong: str = _f("truncate", "what to do with longer sequences", choices=["truncate", "error"])
    train_on_prompt: bool = _f(False, "compute the loss on prompt tokens too (masking off)")
    valid_fraction: float = _f(0.05, "share of train held out for validation when there is no "
                               "validation file (seeded, at least 1 example; 0 = train on everything "
                               "and skip validation)")
    val_max_examples: Optional[int] = _f(None, "validate on a fixed, deterministic subset of this "
                                         "many examples (default: all)")
    group_by_length: bool = _f(False, "batch examples of similar length together (less padding with "
                               "--pack false, but steps of alike examples learn less per step: "
                               "bench/RESULTS.md, issue 28); the order of batches is still shuffled")
    max_examples: Optional[int] = _f(None, "train on the first N training examples after a seeded "
                                     "shuffle (a quick trial run; validation is unchanged; null = all)")
    system_fold: str = _f("auto", "a system turn on a chat template without a system role: fold it "
                          "into the first user turn (auto: only where the template has no system role, "
                          "and the run's config.yaml then records fold; fold: always) or error",
                          choices=["auto", "fold", "error"])
    chat_template: Optional[str] = _f(None, "a Jinja chat template file for the run, for a model without "
                                      "one (a base model) or to replace its own; recorded, so generate "
                                      "and chat of the run use it too")


@dataclass
class LoraConfig:
    rank: int = _f(8, "LoRA rank", flag="--lora-rank")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / rank (mlx-lm's 'scale')",
                      flag="--lora-alpha")
    dropout: float = _f(0.0, "dropout on the LoRA input", flag="--lora-dropout")
    target_modules: list = _f([], "layers to adapt, by their names inside a block, e.g. [self_attn.q_proj, "
                              "mlp.switch_mlp]; a module that is not a linear layer stands for those in it; "
                              "empty = every linear layer of every adapted block (experts too) but MoE "
                              "routers (docs/models.md)",
                              flag="--lora-targets")
    num_layers: int = _f(-1, "adapt the last N transformer blocks (-1 = all)", flag="--lora-layers")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class TrainingConfig:
    epochs: int = _f(3, "passes over all the training data")
    max_steps: Optional[int] = _f(None, "stop after this many optimizer steps (overrides epochs)")
    batch_size: int = _f(4, "examples per micro-batch (and per optimizer step with grad_accumulation 1), "
                         "packed or not (ignored when batch_tokens is set)")
    batch_tokens: Optional[int] = _f(None, "form micro-batches by a token budget instead of a count: "
                                     "examples of similar length, as many as fit in N padded tokens "
                                     "(at least max_seq_length; steps then hold a varying number of "
                                     "examples)")
    pack: bool = _f(True, "lay each call's examples out in shared rows (attention stays inside each "
                    "example): little padding and few compiled shapes; the same examples per step as "
                    "false (one example a row, padded), only laid out differently")
    grad_accumulation: int = _f(1, "micro-batches per optimizer step (token-weighted)")
    merge_micro_batches: str = _f("auto", "packed: run a step's micro-batches as one call when the "
                                  "memory planner says it fits (the same token-weighted gradients, fewer "
                                  "and larger calls: faster on a GPU); off = one call per micro-batch",
                                  choices=["auto", "off"])
    learning_rate: float = _f(1e-4, "peak learning rate")
    lr_schedule: str = _f("cosine", "learning-rate schedule after warmup", choices=["cosine", "constant"])
    warmup_steps: int = _f(0, "linear warmup steps from 0 to the peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    max_grad_norm: Optional[float] = _f(1.0, "clip the global gradient norm (null = no clipping)")
    seed: int = _f(0, "seed of data order, held-out split, LoRA init and dropout")
    eval_every: int = _f(100, "validate every N optimizer steps (and at the end; 0 = only at the end)")
    log_every: int = _f(10, "write a train record to metrics.jsonl every N optimizer steps")
    save_every: int = _f(100, "checkpoint every N optimizer steps (and at each epoch end; 0 = epoch ends only)")
    # null: on for GRPO, whose training pass is short rows in small calls after the rollouts, so
    # recomputing costs little there (bench/RESULTS.md: its CPU peak 1.72 -> 0.70 GB); off otherwise
    grad_checkpoint: Optional[bool] = _f(None, "recompute each block's activations in the backward pass "
                                         "(less memory); null: on for --method grpo, off otherwise")
    chunked_ce: str = _f("auto", "compute the output layer and loss in chunks of tokens, recomputed in the "
                         "backward pass, so the float32 logits of the whole batch never exist at once; "
                         "auto = on for vocabularies of 64k tokens and more", choices=["auto", "on", "off"])
    max_nonfinite: int = _f(3, "stop after this many non-finite losses/gradients in a row")
    patience: Optional[int] = _f(None, "early stopping: stop after N validations without improvement")
    resume: bool = _f(False, "continue from the newest complete checkpoint in the run folder")
    force: bool = _f(False, "train even if the memory planner predicts the run does not fit")
    method: str = _f("sft", "sft (supervised), preference tuning on chosen/rejected pairs: dpo or "
                     "orpo (docs/preference.md), or grpo: reinforcement from rewards of sampled answers "
                     "(docs/grpo.md)", choices=["sft", "dpo", "orpo", "grpo"])
    beta: float = _f(0.1, "dpo: the KL strength beta (higher = stay closer to the reference); orpo: "
                     "lambda, the weight of the odds-ratio term; grpo: the weight of the KL to the base "
                     "model (0 = none, and no reference pass)")
    reference: str = _f("base", "dpo's reference model: base = the base model with the adapters "
                        "switched off (no second copy of the weights)", choices=["base"])


@dataclass
class GrpoConfig:
    reward: list = _f([], "grpo: rewards, comma-separated: answer (the final answer equals the record's "
                      "\"answer\"), format (one <answer>...</answer>), or FILE.py:FUNCTION called with "
                      "(prompt, completion, record) -> float; their sum is the reward")
    group_size: int = _f(4, "grpo: completions sampled per prompt (advantages are relative within a group)")
    max_new_tokens: int = _f(128, "grpo: longest completion in tokens")
    temperature: float = _f(1.0, "grpo: sampling temperature of the completions")
    loss: str = _f("grpo", "grpo: how tokens weigh in the loss: grpo (mean per completion), dr_grpo (sum "
                   "over max_new_tokens, advantages not divided by the std), dapo (every token of the "
                   "step alike)", flag="--grpo-loss", choices=["grpo", "dr_grpo", "dapo"])
    epsilon: float = _f(0.2, "grpo: clip the probability ratio below 1 - epsilon")
    epsilon_high: Optional[float] = _f(None, "grpo: clip the ratio above 1 + epsilon_high (DAPO's clip-higher; "
                                       "null = epsilon)")

    def problems(self, t: "TrainingConfig") -> list[str]:
        """What a GRPO run cannot have (checked with method grpo only)."""
        p = []
        if self.group_size < 2:
            p.append(f"grpo.group_size must be at least 2: advantages compare completions of a prompt "
                     f"(got {self.group_size})")
        if self.max_new_tokens < 1:
            p.append(f"grpo.max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature < math.inf:
            p.append(f"grpo.temperature must be 0 or more and finite (got {self.temperature})")
        for name, v in (("epsilon", self.epsilon), ("epsilon_high", self.epsilon_high)):
            if v is not None and not 0 < v < math.inf:
                p.append(f"grpo.{name} must be positive and finite (got {v})")
        if not self.reward:
            p.append("grpo.reward: --method grpo needs rewards: --reward answer,format (or FILE.py:FUNCTION)")
        if t.batch_tokens:
            p.append("training.batch_tokens is not used by grpo: steps hold batch_size prompts; drop it")
        return p


@dataclass
class OutputConfig:
    dir: Optional[str] = _f(None, "run folder (default runs/<timestamp>)", flag="--out")
    keep_last: int = _f(3, "checkpoints to keep (plus the best)")
    log_to: list = _f(["jsonl"], "where metrics go: jsonl, tensorboard, wandb, mlflow (comma-separated; "
                      "wandb and mlflow take their usual environment: WANDB_PROJECT, MLFLOW_TRACKING_URI)")
    progress: str = _f("auto", "progress display", choices=["auto", "bar", "lines", "none"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Check every value; report all problems at once."""
        p: list[str] = []
        t, d, lo = self.training, self.data, self.lora
        for name, v in [("training.epochs", t.epochs), ("training.batch_size", t.batch_size),
                        ("training.grad_accumulation", t.grad_accumulation), ("lora.rank", lo.rank),
                        ("data.max_seq_length", d.max_seq_length), ("training.log_every", t.log_every),
                        ("training.max_nonfinite", t.max_nonfinite), ("output.keep_last", self.output.keep_last)]:
            if v < 1:
                p.append(f"{name} must be at least 1 (got {v})")
        for name, v in [("training.eval_every", t.eval_every), ("training.save_every", t.save_every),
                        ("training.warmup_steps", t.warmup_steps)]:
            if v < 0:
                p.append(f"{name} must be 0 or more (got {v})")
        if t.max_steps is not None and t.max_steps < 1:
            p.append(f"training.max_steps must be at least 1 (got {t.max_steps})")
        if not 0 < t.learning_rate <= MAX_LEARNING_RATE:  # NaN fails this too
            p.append(f"training.learning_rate must be a positive number, at most {MAX_LEARNING_RATE:g} "
                     f"(got {t.learning_rate})")
        if t.max_grad_norm is not None and not 0 < t.max_grad_norm < math.inf:
            p.append(f"training.max_grad_norm must be positive and finite, or null for no clipping "
                     f"(got {t.max_grad_norm})")
        if t.batch_tokens is not None and t.batch_tokens < d.max_seq_length:
            p.append(f"training.batch_tokens must be at least data.max_seq_length ({d.max_seq_length}) so "
                     f"the longest example fits in one micro-batch (got {t.batch_tokens})")
        if not (0 <= t.beta if t.method == "grpo" else 0 < t.beta) or not t.beta < math.inf:
            p.append(f"training.beta must be {'0 or more' if t.method == 'grpo' else 'positive'} and finite "
                     f"(got {t.beta})")
        if t.grad_checkpoint is None:
            t.grad_checkpoint = t.method == "grpo"
        if t.method == "grpo":
            p += self.grpo.problems(t)
        elif self.grpo.group_size != GrpoConfig.group_size:
            p.append(f"grpo.group_size (--group-size) is GRPO's completions per prompt and needs --method grpo; "
                     f"the quantization group size is --quant-group-size (got {self.grpo.group_size})")
        if t.patience is not None and t.patience < 1:
            p.append(f"training.patience must be at least 1 or null (got {t.patience})")
        if not 0 <= lo.dropout < 1:
            p.append(f"lora.dropout must be in [0, 1) (got {lo.dropout})")
        if not 0 < lo.alpha < math.inf:
            p.append(f"lora.alpha must be positive and finite (got {lo.alpha})")
        if lo.num_layers == 0 or lo.num_layers < -1:
            p.append(f"lora.num_layers must be -1 (all) or at least 1 (got {lo.num_layers})")
        if not 0 <= d.valid_fraction < 1:
            p.append(f"data.valid_fraction must be at least 0 and below 1 (got {d.valid_fraction})")
        if d.max_examples is not None and d.max_examples < 1:
            p.append(f"data.max_examples must be at least 1 or null (got {d.max_examples})")
        if d.val_max_examples is not None and d.val_max_examples < 1:
            p.append(f"data.val_max_examples must be at least 1 or null (got {d.val_max_examples})")
        for x in self.output.log_to:
            if x not in ("jsonl", "tensorboard", "wandb", "mlflow"):
                p.append(f"output.log_to: unknown sink {excerpt(x)}; use jsonl, tensorboard, wandb and/or mlflow")
        p += range_problems(self, p)
        for section in (getattr(self, name) for name in SECTIONS):
            for f in fields(section):
                ch = f.metadata.get("choices")
                if ch and getattr(section, f.name) not in ch:
                    p.append(f"{_section_name(section)}.{f.name} must be one of {', '.join(map(str, ch))} "
                             f"(got {excerpt(getattr(section, f.name))})")
        collect(p, "invalid configuration")
        return self


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig,
            "training": TrainingConfig, "grpo": GrpoConfig, "output": OutputConfig}


def _section_name(section) -> str:
    return {cls: name for name, cls in SECTIONS.items()}[type(section)]


def excerpt(value, limit: int = 80) -> str:
    """A bounded repr of a config value for a message: a YAML alias bomb is a small tree whose
    full repr is gigabytes, so nesting, items and strings are cut before anything is built."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother, r.maxlong = 2, 4, 4, limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def range_problems(cfg: "Config", reported: list[str]) -> list[str]:
    """Finite numbers and sane ranges for what the specific checks in Config.validate do not
    cover: every float setting finite, in float32 too (NaN passes `v < 0`; 1e308 is finite in
    Python and inf in float32), the seed, counts, epochs, weight decay.
    A setting already in `reported` is not reported twice."""
    p: list[str] = []
    t = cfg.training
    said = lambda name: any(x.startswith(name + " ") for x in reported + p)  # noqa: E731
    if not 0 <= t.seed <= MAX_SEED:
        p.append(f"training.seed must be between 0 and {MAX_SEED} (got {excerpt(t.seed)})")
    wd = t.weight_decay
    if not 0 <= wd < math.inf:
        p.append(f"training.weight_decay must be a finite number, 0 or more (got {wd})")
    elif 0 < t.learning_rate <= MAX_LEARNING_RATE and wd * t.learning_rate >= 1:  # AdamW multiplies weights by 1 - lr * wd each step
        p.append(f"training.weight_decay times the learning rate must be below 1, or every step flips "
                 f"the weights' sign (got {wd} x {t.learning_rate})")
    if t.epochs > MAX_EPOCHS:
        p.append(f"training.epochs must be at most {MAX_EPOCHS} (got {excerpt(t.epochs)}); set "
                 "max_steps to train longer")
    for section in (getattr(cfg, name) for name in SECTIONS):
        for f in fields(section):
            name, v = f"{_section_name(section)}.{f.name}", getattr(section, f.name)
            if isinstance(v, bool) or said(name) or name == "training.seed":
                continue
            if isinstance(v, float) and not math.isfinite(v):
                p.append(f"{name} must be a finite number (got {v})")
            elif isinstance(v, float) and abs(v) > FLOAT32_MAX:  # 1e308 is inf once training reads it
                p.append(f"{name} must be finite in float32, the precision training computes in: at most "
                         f"{FLOAT32_MAX:.4g} (got {v:g})")
            elif isinstance(v, int) and abs(v) > MAX_COUNT:
                p.append(f"{name} must be at most {MAX_COUNT} (got {excerpt(v)})")
    return p


def _closest(name: str, valid) -> str:
    m = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a UserError that names the key."""
    t = str(f.type)
    if value is None or ("Optional" in t and isinstance(value, str) and value.lower() in ("null", "none")):
        if "Optional" in t:  # a flag says null as YAML does (--max-grad-norm null)
            return None
        raise UserError(f"{where}: {f.name} cannot be null")
    try:
        if "bool" in t:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if "list" in t:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return value
        if "int" in t:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if "float" in t:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        kind = t.replace("Optional[", "").rstrip("]")
        raise UserError(f"{where}: {f.name} must be {kind}, got {excerpt(value)}") from None


def apply_overrides(cfg: Config, tree: dict, source: str) -> Config:
    """Apply a nested {section: {key: value}} mapping onto cfg; unknown keys are errors."""
    if not isinstance(tree, dict):
        raise UserError(f"{source}: the config must be a mapping of sections "
                        f"({', '.join(SECTIONS)}), got {type(tree).__name__}")
    problems = []
    for sec, values in tree.items():
        if sec not in SECTIONS:
            problems.append(f"{source}: unknown section '{str(sec)[:80]}'{_closest(str(sec)[:200], SECTIONS)}")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{source}: section '{sec}' must be a mapping, got {type(values).__name__}")
            continue
        obj = getattr(cfg, sec)
        by_name = {f.name: f for f in fields(obj)}
        for k, v in values.items():
            if k not in by_name:
                problems.append(f"{source}: unknown key '{sec}.{str(k)[:80]}'{_closest(str(k)[:200], by_name)}")
                continue
            try:
                setattr(obj, k, _coerce(v, by_name[k], f"{source}: {sec}"))
            except UserError as e:
                problems.append(str(e))
    collect(problems, f"{source}: invalid config")
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; check the path")
    try:
        text = path.read_text(encoding="utf-8")
        tree = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{line}: {problem}; fix the YAML syntax") from None
    except RecursionError:
        raise UserError(f"{path}: the YAML nests deeper than Python's limit; a config is two levels "
                        "deep (section: key: value)") from None
    except ValueError as e:  # PyYAML builds dates and ints itself: 2024-13-45, a 5000-digit number
        raise UserError(f"{path}: a value YAML cannot read ({str(e).splitlines()[0]}); "
                        "fix it, or quote it if it is meant as text") from None
    return tree or {}


def flag_table() -> dict[str, tuple[str, dataclasses.Field]]:
    """CLI flag -> (section, field). Flag names are unique across the tree."""
    table = {}
    for sec in SECTIONS:
        for f in fields(SECTIONS[sec]):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag not in table, flag
            table[flag] = (sec, f)
    return table


def resolve(config_file: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults < YAML file < overrides ({section: {key: value}}, e.g. from CLI flags)."""
    cfg = Config()
    if config_file:
        apply_overrides(cfg, load_yaml(config_file), str(config_file))
    if overrides:
        apply_overrides(cfg, overrides, "command line")
    return cfg.validate()


def save_yaml(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # the run folder appears once its run has started
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def from_dict(tree: dict) -> Config:
    return apply_overrides(Config(), tree, "config").validate()


def add_config_flags(parser) -> None:
    """Add an optional positional CONFIG (YAML) and one flag per config field. Flags default to
    'not given' (SUPPRESS) so only what the user typed overrides the file."""
    import argparse

    parser.add_argument("config", nargs="?", default=None, help="YAML config file (flags override it)")
    for flag, (sec, f) in flag_table().items():
        kw = {"dest": f"cfg__{sec}__{f.name}", "default": argparse.SUPPRESS, "metavar": f.name.upper(),
              "help": f"{f.metadata.get('help', '')} [{sec}.{f.name}, default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()}]"}
        if "bool" in str(f.type):
            kw.update(nargs="?", const="true", metavar="true|false")
        elif f.metadata.get("choices"):
            kw.update(choices=[str(c) for c in f.metadata["choices"]], metavar=None)
        parser.add_argument(flag, **kw)


def overrides_from_args(args) -> dict:
    """{section: {field: value}} from the flags the user gave (see add_config_flags)."""
    tree: dict = {}
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            _, sec, name = key.split("__", 2)
            tree.setdefault(sec, {})[name] = value
    return tree


def from_args(args) -> Config:
    """Defaults < YAML file < flags, validated."""
    return resolve(getattr(args, "config", None), overrides_from_args(args))
