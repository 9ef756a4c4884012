"""Loading a tuned model (base + adapters of a run) and answering prompts with mlx-lm's generator."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from .config import ModelConfig, load_yaml
from .errors import UserError
from .model import LoadedModel, load_base


def adapter_dir(run: str | Path) -> Path:
    """A run folder's adapters (or an adapter folder itself)."""
    p = Path(run)
    for cand in (p / "adapters", p):
        if (cand / "adapter_config.json").is_file() and (cand / "adapters.safetensors").is_file():
            return cand
    raise UserError(f"{p}: no adapters found (expected adapters/adapters.safetensors and "
                    "adapter_config.json); pass a run folder of steadytune train")


def run_model_config(run: str | Path) -> ModelConfig:
    """The model section of a run's config.yaml (which base the adapters belong to)."""
    run = Path(run)
    for cand in (run / "config.yaml", run.parent / "config.yaml"):
        if cand.is_file():
            tree = load_yaml(cand)
            return ModelConfig(**{k: v for k, v in (tree.get("model") or {}).items()
                                  if k in ModelConfig.__dataclass_fields__})
    return ModelConfig()


def load_tuned(run: str | Path | None, model: str | None = None, dtype: str = "auto") -> LoadedModel:
    """Base model (from `model`, else the run's config) with the run's adapters applied."""
    from mlx_lm.tuner.utils import load_adapters

    mcfg = run_model_config(run) if run else ModelConfig()
    if model:
        mcfg.path = model
    mcfg.dtype = dtype
    loaded = load_base(mcfg)
    if run:
        adir = adapter_dir(run)
        try:
            load_adapters(loaded.model, str(adir))
        except (ValueError, KeyError, AttributeError, TypeError, RuntimeError, json.JSONDecodeError) as e:
            raise UserError(f"{adir}: adapters do not fit this model ({str(e).splitlines()[0]}); "
                            "pass the --model the run was trained on") from None
    loaded.model.eval()
    mx.eval(loaded.model.parameters())  # lazy adapter weights fail if first used from another thread
    return loaded


def to_messages(prompt: str | list | None = None, system: str | None = None) -> list[dict]:
    if isinstance(prompt, list):
        return prompt
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt or ""}]


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt tokens through the chat template (plain text when the tokenizer has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    text = "\n".join(m["content"] for m in messages)
    return tokenizer.encode(text)


def generate(loaded: LoadedModel, messages: list[dict] | str, max_tokens: int = 256,
             temperature: float = 0.0, stream: bool = False):
    """Greedy by default. With stream=True, yields text pieces; otherwise returns the answer."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tokens = render_prompt(loaded.tokenizer, to_messages(messages))
    sampler = make_sampler(temp=temperature)
    pieces = (r.text for r in stream_generate(loaded.model, loaded.tokenizer, tokens,
                                              max_tokens=max_tokens, sampler=sampler))
    return pieces if stream else "".join(pieces)


def complete(model, tokenizer, prompt: str, max_tokens: int = 64, stop: str | None = None) -> str:
    """Greedy raw-text continuation of `prompt` (no chat template), cut at `stop`."""
    from mlx_lm.generate import stream_generate

    out = ""
    for r in stream_generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=max_tokens):
        out += r.text
        if stop and stop in out:
            return out.split(stop)[0]
    return out
