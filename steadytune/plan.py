"""The memory planner: predict a training run's peak memory before anything loads (the command:
commands/plan.py). One module of ~800 lines on purpose: the calibrated constants, the terms of the
estimate and the search for what fits are fitted and changed together (docs/plan-memory.md);
the rules it shares with the trainer (padding, loss chunking, compute mode, fused update) are
imported from where the trainer uses them.

The prediction adds up what is alive at the worst moment of a training step (without
checkpointing the start of the backward pass of the largest micro-batch; with it the largest of
three moments, see `estimate`), each term from the model's shapes and the settings:

  base weights      the frozen base as the trainer holds it: packed 4/8-bit words plus scales and
                    biases (in the compute dtype), or plain compute-dtype arrays
  LoRA weights      A and B of every adapted layer, float32 (mlx-lm creates them so)
  optimizer state   AdamW's two moments (float32), and the running sum of gradients when gradient
                    accumulation is on (new gradients appear only as activations are freed)
  activations       what the forward pass keeps for the backward one, per adapted block: see
                    `block_bytes`; with gradient checkpointing each block's input, or the inputs
                    of its LoRA layers (the fused update's moment), and all of it for the blocks
                    checkpointing leaves whole (gemma3n's and Gemma 4's KV-linked layers)
  logits and loss   the logits and the cross-entropy's intermediates and gradient, per token and
                    vocabulary entry (of one chunk when the loss is chunked)
  in flight         MLX runs ahead of the device: the CPU encoder dispatches up to ~100 operations
                    before they execute, CUDA up to ~10 graphs, and each operation keeps its inputs,
                    outputs and temporaries alive until it has run; measured in "blocks of
                    backward work" (on CUDA up to a limit, plus the kernels' temporaries); with
                    checkpointing also the block being recomputed
  overhead          memory outside MLX's allocator: the Python process and libraries on the CPU,
                    the CUDA context and library workspaces on a GPU

The first six are what `mx.get_peak_memory()` reports; bench/memory.py compares them with measured
peaks (docs/plan-memory.md lists the results and explains each constant below).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .batching import buckets_rows, call_layout, min_width, padded_width, row_target, row_width, width_bucket
from .errors import UserError

GB = 1e9
F32 = 4                 # LoRA weights, their gradients and AdamW's moments are float32
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# --- calibration: measured with bench/memory.py (CPU) and on one H100 (docs/plan-memory.md) -----
# Logits-sized arrays alive around the loss (steadytune.loss.token_cross_entropy): on the CPU the
# logits in float32 and the cross-entropy's intermediates and gradient (3 float32 arrays, plus the
# half-precision logits and gradient when computing in half precision); on a GPU the fused
# cross-entropy reads the compute-dtype logits and writes their gradient (2 arrays).
LOSS_ARRAYS = {"cpu": 3, "metal": 2, "cuda": 2}
# Blocks of work MLX has dispatched but not run (the module docstring). CPU: 10 tasks of 10
# dispatches, ~1.2 blocks (bench/memory.py, 2-core Linux). Metal is not measured yet: its command
# buffers hold ~50 operations, so a few blocks at most. CUDA: see below.
IN_FLIGHT_BLOCKS = {"cpu": 1.18, "metal": 2.0, "cuda": 24.0}
# A checkpointed step on the CPU, attention unfused, block by block (estimate): the heads x width^2
# float32 arrays alive, which IN_FLIGHT_BLOCKS does not multiply. The block being differentiated
# holds 3 (its probabilities, their gradient, and their product for the softmax backward's row
# sum); the next block's recomputation, dispatched ahead, 1. Measured on the 2-core CPU with
# bench/memory.py's small llama, 1 x 1,024 to 8,192 positions, fitted as a x heads x width^2 +
# b x tokens (docs/plan-memory.md, "Checkpointed long context on the CPU").
CPU_ATTENTION_BACKWARD_ARRAYS = 3
CPU_ATTENTION_AHEAD_ARRAYS = 1
# CUDA: every kernel's inputs and temporaries stay alive until the CUDA graph it was recorded in has
# run, and the host records graphs ahead of the GPU (MLX 0.32 on compute capability 9.0: a graph
# closes after 100 operations or 1,000 MB of inputs, and up to 10 run at a time). How far ahead
# depends on the step: with a few hundred tokens the GPU keeps up and little is queued; from
# ~2,000 tokens the host is as far ahead as MLX lets it be and what is queued stops growing. So: up
# to IN_FLIGHT_BLOCKS blocks of work, but at most CUDA_RUN_AHEAD bytes of activations, plus with
# compute=dequant the dequantized weights of CUDA_DEQUANT_BLOCKS blocks, plus CUDA_TEMPORARIES
# (cuBLAS workspaces, up to 32 MiB a matmul on Hopper). Fitted to the 12 H100 80GB runs of the
# current trainer in docs/plan-memory.md (7B shape, MLX 0.32.4, 2026-11-25: 128 to 4,096 tokens a
# step, native and dequant, with and without checkpointing; all within 12%). The previous trainer
# (gradients, norm and update in separate calls, adapters promoting their input to float32) ran
# further ahead: its checkpointed steps are up to 43% above this model.
# Both block counts are the 7B block's. A block with less matmul work per token queues fewer blocks
# (cuda_block_share): the GPU runs its small matmuls about as fast as the host records the block's
# operations, so the host gets less far ahead. gemma-3n-E2B's and gemma-4-E2B's blocks (0.28 and
# 0.24 of the 7B block's weights, 1 x 1,024 tokens on an H200, 2026-12-07) held 5.8-9 blocks of
# their work in flight where 24 were planned (+23% to +38%); with the share, 6.8 and 5.9. Nothing
# is fitted to them: the share is the ratio of weights to CUDA_REFERENCE_BLOCK, the block the
# counts were fitted on. The 7B rows show no such dependence on the tokens a step (1 x 512 holds
# about 20 blocks), so the share does not depend on them. Blocks with more weights than the 7B
# block (MoE blocks, every expert counted: 3 to 8 times as many) keep the fitted counts, as
# measured (Qwen3-30B-A3B's and Qwen3-Next-80B's blocks, H100: -4.1%..+10.0%, but Qwen3-30B-A3B at
# 1 x 1,024 +22.1%, not explained; docs/plan-memory.md).
CUDA_RUN_AHEAD = 7.0 * GB
# The blocks of work in flight MLX keeps even when its memory limit stops it dispatching more (the
# elastic part's floor), and the fewest a step has in flight however light its blocks.
CUDA_MIN_BLOCKS = 2.0
CUDA_DEQUANT_BLOCKS = 7
CUDA_TEMPORARIES = 1.0 * GB
# The 7B block's linear-layer weights (hidden 4096, MLP 14,336, 32 query and 8 key-value heads of
# 128): the block the CUDA counts above were fitted on.
CUDA_REFERENCE_BLOCK = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336
OVERHEAD = {"cpu": 0.4 * GB, "metal": 0.5 * GB, "cuda": 1.0 * GB}
# Transient arrays of one block's attention backward when CUDA recomputes attention unfused
# (sequence width not a multiple of 128): scores, probabilities and their gradients.
UNFUSED_ATTENTION_ARRAYS = 4
# compute=dequant, the loss not chunked: the output layer's weight, dequantized for the forward
# matmul and again for the backward one, is alive around the loss (a block's weights are small next
# to its activations). A chunked loss dequantizes it once per call: one copy (_dequant_head).
DEQUANT_HEAD_COPIES = 1.75
# The chunked loss on the CPU: chunks of float32 logits alive at once, n + CHUNKS_AHEAD_CPU for a
# step of n chunks, at most CHUNKS_ALIVE_CPU (measured: _loss_bytes)
CHUNKS_AHEAD_CPU = 3
CHUNKS_ALIVE_CPU = 13

# The linear layers of a llama-style block -> (input, output) dimension names and the input it reads
# (shared inputs are kept once): the base weights of a config-only Arch, and the adapters of a Run
# built without the model's config (a synthetic shape). A run of a real model plans the adapters
# model.lora_targets finds in the model's skeleton (Run.lora).
MODULES = {
    "self_attn.q_proj": ("hidden", "q", "attn_in"),
    "self_attn.k_proj": ("hidden", "kv", "attn_in"),
    "self_attn.v_proj": ("hidden", "kv", "attn_in"),
    "self_attn.o_proj": ("q", "hidden", "attn_out"),
    "mlp.gate_proj": ("hidden", "inter", "mlp_in"),
    "mlp.up_proj": ("hidden", "inter", "mlp_in"),
    "mlp.down_proj": ("inter", "hidden", "mlp_out"),
}


# --------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class Arch:
    """The shapes the planner needs, from a config.json-like dict."""
    hidden: int
    layers: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    quantization: dict | None = None  # mlx-lm's "quantization": the base is stored quantized
    # Elements of one Gated DeltaNet layer's state per token (value heads x value dim x key dim;
    # Qwen3-Next, Qwen3.5); 0 for a model without such layers. See RECURRENCE_STATES.
    recurrent_state: int = 0
    recurrent_layers: int = 0
    model_type: str = ""
    # gemma3n and gemma4: the layers that attend to another layer's keys and values (through its
    # cache, or passed on as a call argument) and the layers whose keys they read
    # (qlora.kv_linked_layers); --grad-checkpoint leaves them whole, so they keep all their saved
    # arrays in a checkpointed run. () for every other model.
    kv_linked: tuple = ()
    # gemma3n's AltUp: every block takes and returns this many hidden states (altup_num_inputs),
    # which is what a checkpointed block keeps; 0 for every other model (one hidden state)
    altup: int = 0
    # intermediate-sized arrays a block's MLP keeps per token for the backward pass: 3 for a
    # SwiGLU MLP (block_bytes), GELU_MLP_ARRAYS for gemma3n's, GEGLU_MLP_ARRAYS for Gemma 4's
    mlp_arrays: float = 3.0
    # Gemma 4 (gemma4_text): hidden-sized and query-sized arrays a block keeps per token beyond a
    # llama block's (GEMMA4_HIDDEN_ARRAYS, GEMMA4_HEAD_ARRAYS); the layers whose MLP is twice
    # intermediate_size (use_double_wide_mlp: the KV-shared layers); the width of each layer's
    # per-layer input (hidden_size_per_layer_input; 0: none). 0, 0, () and 0 for every other model.
    hidden_arrays: float = 0.0
    head_arrays: float = 0.0
    wide_mlp: tuple = ()
    per_layer_input: int = 0

    @property
    def stream(self) -> int:
        """Elements per token a block passes to the next: what a checkpointed block keeps."""
        return self.hidden * max(1, self.altup)

    @property
    def dims(self) -> dict:
        return {"hidden": self.hidden, "inter": self.inter, "q": self.heads * self.head_dim,
                "kv": self.kv_heads * self.head_dim}

    def shape(self, module: str) -> tuple[int, int]:
        d_in, d_out, _ = MODULES[module]
        return self.dims[d_in], self.dims[d_out]


def arch_from_config(config: dict) -> Arch:
    c = dict(config.get("text_config") or {}, **{k: v for k, v in config.items() if k != "text_config"})
    inter = c.get("intermediate_size")
    if isinstance(inter, list) and inter and all(isinstance(n, int) for n in inter):
        # one MLP width per layer (gemma3n): the widest, so no layer is planned smaller than it is
        # (the released models give every layer the same width)
        c["intermediate_size"] = max(inter)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                           "num_attention_heads", "vocab_size") if not isinstance(c.get(k), int)]
    if missing:
        raise UserError(f"model config: {', '.join(missing)} missing; the planner needs a llama-style "
                        "config (hidden_size, num_hidden_layers, intermediate_size, num_attention_heads, "
                        "vocab_size)")
    heads = c["num_attention_heads"]
    q = c.get("quantization") or c.get("quantization_config")
    # Gated DeltaNet layers (qwen3_next, qwen3_5): every layer but each full_attention_interval-th
    state, linear, every = 0, 0, c.get("full_attention_interval") or 1
    if isinstance(c.get("linear_num_value_heads"), int) and every > 1:
        state = c["linear_num_value_heads"] * c.get("linear_value_head_dim", 128) * c.get("linear_key_head_dim", 128)
        linear = c["num_hidden_layers"] - c["num_hidden_layers"] // every
    return Arch(recurrent_state=state, recurrent_layers=linear, model_type=str(c.get("model_type") or ""),
                **_gemma_fields(c),
                hidden=c["hidden_size"], layers=c["num_hidden_layers"], inter=c["intermediate_size"],
                heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                # mlx-lm's llama ties the output layer to the embedding unless the config says not
                tied=bool(c.get("tie_word_embeddings", True)),
                quantization=q if isinstance(q, dict) and "bits" in q else None)


def _gemma_fields(c: dict) -> dict:
    """Arch's gemma3n and gemma4 fields from the (merged) config: the KV-linked layers as the
    trainer finds them in mlx-lm's model (_kv_linked), gemma3n's AltUp streams and GELU MLP, and
    Gemma 4's GEGLU MLP, its blocks' other hidden-sized arrays, its double-width MLPs and per-layer
    inputs, as mlx-lm's gemma4_text builds them."""
    kind = str(c.get("model_type") or "")
    if kind.startswith("gemma3n"):
        return dict(kv_linked=_kv_linked(c.get("layer_types"), c.get("num_kv_shared_layers") or 0, "gemma3n"),
                    altup=c.get("altup_num_inputs") or 0, mlp_arrays=GELU_MLP_ARRAYS)
    if kind.startswith("gemma4"):
        # mlx-lm's defaults where the config is silent (20 shared layers, every 5th layer global)
        from mlx_lm.models.gemma4_text import ModelArgs

        args = ModelArgs.from_dict(c)
        first_shared = args.num_hidden_layers - args.num_kv_shared_layers
        # mlx-lm's MLP: twice as wide in the KV-shared layers (`layer_idx >= first_shared > 0`)
        wide = tuple(range(first_shared, args.num_hidden_layers)) if args.use_double_wide_mlp and first_shared > 0 \
            else ()
        return dict(kv_linked=_kv_linked(args.layer_types[:args.num_hidden_layers], args.num_kv_shared_layers,
                                         "gemma4_text"),
                    mlp_arrays=GEGLU_MLP_ARRAYS, hidden_arrays=GEMMA4_HIDDEN_ARRAYS,
                    head_arrays=GEMMA4_HEAD_ARRAYS, wide_mlp=wide,
                    per_layer_input=args.hidden_size_per_layer_input or 0)
    return {}


def _kv_linked(types, shared: int, family: str) -> tuple:
    """The layers of a gemma3n or gemma4_text config that --grad-checkpoint leaves whole
    (qlora.kv_linked_layers): the last `shared` layers attend to the keys and values of an
    earlier layer, by the rule both mlx-lm models follow (qlora.gemma3n_cache_layers), and are
    linked to it."""
    if not shared or not isinstance(types, list):
        return ()
    from .qlora import cache_linked, gemma3n_cache_layers

    first = max(0, len(types) - shared)
    missing = sorted(set(types[first:]) - set(types[:first]))
    if missing:
        raise UserError(f"model config: the last {shared} layers (num_kv_shared_layers) read the cache "
                        f"of an earlier {missing[0]} layer, and layer_types has none before them; "
                        f"mlx-lm's {family} cannot build this model")
    return tuple(sorted(cache_linked(gemma3n_cache_layers(types, shared))))


def read_model_config(path: str, source: tuple[str, str] | None = None, requant=(4, 64)) -> dict:
    """The config.json (or the equivalent from GGUF metadata) of a model argument, without loading
    any weights; `source`: resolve_source(path), where the caller has it; `requant`: the (bits,
    group size) a GGUF's other tensor types become on load (model.gguf_requant)."""
    from .model import resolve_source

    kind, src = source or resolve_source(path)
    if kind == "gguf":
        return gguf_model_config(src, *requant)
    if kind == "hub":
        return _cached_hub_config(src)
    f = Path(src) / "config.json"
    if not f.is_file():
        raise UserError(f"{src}: no config.json; a model folder needs config.json, *.safetensors and "
                        "the tokenizer files")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e}); restore the model's config.json") from None


def _is_hub(path: str) -> bool:
    from .model import resolve_source

    try:
        return resolve_source(path)[0] == "hub"
    except UserError:
        return False


def _cached_hub_config(repo: str) -> dict:
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(repo, "config.json")
    except Exception:  # noqa: BLE001  (no huggingface_hub, malformed id: same answer)
        cached = None
    if not isinstance(cached, str):
        from .model import hub_cache_dir

        raise UserError(f"{repo}: not in the local Hugging Face cache ({hub_cache_dir()}), and plan does not "
                        f"download; run `hf download {repo}` first, or pass a model folder")
    return json.loads(Path(cached).read_text(encoding="utf-8"))


def gguf_model_config(path: str, bits: int | None = 4, group_size: int = 64) -> dict:
    """A config.json-like dict from a GGUF file's header (gguf.py's one reader), with mlx-lm's
    "quantization" entry for the layers as loading builds them. Reads the header only."""
    from .gguf import gguf_model_config as read

    return read(path, bits, group_size)


def _gguf_quantization(tensors: dict) -> dict | None:
    """mlx-lm style quantization of a llama GGUF's tensors {name: (type, shape fastest-axis-first)}:
    the common setting plus per-module exceptions (False = not quantized); gguf.py's rule."""
    from .gguf import ARCHS, GGUFHeader, quantization_entry

    header = GGUFHeader(3, {}, {n: (t, tuple(reversed(shape))) for n, (t, shape) in tensors.items()})
    return quantization_entry(header, ARCHS["llama"], 4, 64)


# --------------------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class Run:
    """The settings that decide memory, for the largest micro-batch."""
    batch: int                # rows of the micro-batch (with a token budget: rows at the widest width)
    seq: int                  # padded input width (tokens per row the model sees)
    checkpoint: bool = False
    rank: int = 8
    keys: tuple = tuple(MODULES)
    lora_layers: int = -1     # adapt the last N blocks (-1 = all)
    bits: int | None = 4      # quantize a float base on load to this (None = keep it float)
    group_size: int = 64
    dtype: str = "float32"
    compute: str = "native"   # native (quantized_matmul) or dequant (dequantize + dense matmul)
    device: str = "cpu"       # cpu, cuda or metal
    accumulation: int = 1
    loss_chunk: int = 0       # tokens per chunk of a chunked cross-entropy (0 = not chunked)
    token_budget: int = 0     # --batch-tokens: micro-batches of up to this many tokens (0 = batch x seq)
    packed: bool = False      # --pack: rows of several examples, with a (batch, 1, seq, seq) attention mask
    examples: int = 0         # packed: examples per call (batch_size) laid out in those rows
    # How the step is run. The trainer computes the last micro-batch's gradients, their norm and
    # the update in one compiled call (step.fuses_update: one process); False: gradients first,
    # then the update (several processes, and steadytune before the fused update).
    fused_update: bool = True
    # The update on one concatenated vector (step.flat_update: Step(flat=True), the trainer's
    # default for AdamW on its float32 adapters); False: array by array.
    flat_update: bool = True
    # mlx-lm's LoRALinear promotes a half-precision input to float32 for the adapter matmuls and
    # keeps that copy; steadytune's MixedLoRALinear computes them in the input's dtype (False).
    # True describes mlx-lm's trainer and steadytune before MixedLoRALinear.
    lora_input_f32: bool = False
    # The adapted layers (model.LoraTarget, every adapted block) as model.lora_targets finds them
    # in the model's skeleton, and the experts each token is routed to (for the expert layers'
    # saved inputs); empty: `keys` of MODULES in each adapted block (a synthetic llama shape).
    lora: tuple = ()
    experts_per_token: int = 1
    # Every weight of the model's skeleton as (path, elements, input width, kind): "layer" (one
    # load_base quantizes: model.quantized_on_load), "embedding", or "float" (norms, biases, ...);
    # empty: the llama-style block of MODULES (a synthetic shape).
    weights: tuple = ()
    # What each adapted block mixes tokens with and what its MLP is, for MoE and Mamba-2 models
    # (model_mixers): (attention 0/1, dense MLP width, routed experts' width, expert layers reading
    # the input, Mamba-2 heads, Mamba-2 in_proj width, Mamba-2 state elements, linear mixer width)
    # per block; empty: every block an attention block with the config's dense MLP (dense models,
    # a synthetic shape).
    mixers: tuple = ()
    # A query-key pair's cost in positions on the CPU (batching.pair_cost, from the model: the
    # trainer's own attention_pair_cost): a call is laid out packed only where that computes less
    # (batching.call_layout), and the plan lays out the largest call the same way. 0: always packed.
    pair: float = 0.0
    # The model's logical parameters (step.model_parameters, as the trainer counts them): on CUDA
    # they set the narrowest packed row (batching.min_width, Run.floor). 0: unknown (128).
    params: int = 0

    @property
    def floor(self) -> int:
        return min_width(self.device, self.params)

    @property
    def tokens(self) -> int:
        return max(self.token_budget, self.batch * self.seq)


@dataclass
class Breakdown:
    """Bytes per term (see the module docstring), at the moment of the step that needs the most."""
    base_weights: float
    lora_weights: float
    optimizer: float
    activations: float
    logits: float
    in_flight: float
    overhead: float
    elastic: float = 0.0      # the part of in_flight MLX gives up when memory runs short (CUDA)

    @property
    def peak(self) -> float:
        """What mx.get_peak_memory() reports on a device with room to spare."""
        return (self.base_weights + self.lora_weights + self.optimizer + self.activations
                + self.logits + self.in_flight)

    @property
    def required(self) -> float:
        """What the device must hold, overhead included."""
        return self.peak - self.elastic + self.overhead

    def as_dict(self) -> dict:
        return asdict(self) | {"peak": self.peak, "required": self.required}


# The Gated DeltaNet recurrence in training (recurrence.py: the chunkwise form) keeps about
# RECURRENCE_STATES float32 states' worth (value heads x value dim x key dim) a token while one
# layer's backward pass runs, and, without checkpointing, RECURRENCE_KEPT more for each other Gated
# DeltaNet layer (per token and head: its float32 q, k, v, the chunk's decays and products, the
# corrections through the triangular solve; a state per chunk). The chunkwise operation alone
# peaks at 0.48 states a token forward and backward (tests/test_recurrence.py's shapes, linear in
# the heads); fitted on the CPU to bench/memory.py --moe --only qwen3_next (1 to 6 such layers, 4
# to 8 value heads of 128 x 128, 2 to 4 rows of 512 to 2,048 tokens, with and without
# checkpointing), where the rest of the plan is itself off by up to a tenth of a GB on these small
# models: 8 of 9 within -13.1%..+11.5%, a 1 x 2,048 row +25% from the rest of its plan, not this
# term (docs/plan-memory.md). mlx-lm's loop a token at a time kept about 15
# states a token, its loop in checkpointed chunks 3.
# On CUDA the term is not added: there the recurrence's arrays fall inside what the planner counts
# as the work in flight (_in_flight, up to CUDA_RUN_AHEAD), whose blocks are the same layers'
# work. Measured on an H100 (bench/memory.py --moe, 2026-12-07), the three Qwen3-Next-shaped rows
# (1 x 512, 1 x 1,024, 4 x 256; 0.8-1.6 GB of this term) are above their peaks with any positive
# share of it (+1.9%, +4.5%, +10.0% with none; +11.4..+20.7% with all of it); held out,
# bench/moe.py's epoch at 4 x 1,024 (6.4 GB of it; 21.13 GB measured) is planned +5.0% without
# it, +35.5% with it (docs/plan-memory.md).
RECURRENCE_STATES = 0.33
RECURRENCE_KEPT = 0.21
# A linear mixer's block (Gated DeltaNet, LFM2's short convolution; model_mixers) keeps
# LINEAR_MIXER_ARRAYS arrays a token of its input projections' width, in the compute dtype, instead
# of attention's arrays (heads x width^2 probabilities only the full-attention blocks have). Fitted
# (2026-12-07) to the qwen3_next rows of bench/memory.py --moe on the CPU (9), on an H100 (3,
# Qwen3-Next-80B's block) and tests/test_recurrence.py's model, the largest error made smallest
# over 0 to 2: all 13 within -13.4%..+14.8%, where every block planned as an attention block gave
# up to +25.0% (docs/plan-memory.md). Fewer than the arrays such a block makes (projections,
# convolution, norms, gate): the fit also absorbs what the rest of the plan is off by on these
# shapes.
LINEAR_MIXER_ARRAYS = 0.75
# MoE and Mamba-2 blocks (Run.mixers, each block as the skeleton has it; _mixer_bytes). Fitted on the
# CPU (float32, 2026-12-06; least squares on the relative error, rounded) to `bench/memory.py --moe`
# and 14 probes: qwen3_moe (8-32 experts, 2-8 a token, expert width 256-512), granitemoehybrid
# (Mamba-2 and attention blocks, each with experts and a shared MLP; 2 to 8 blocks, 128 to 1,024
# tokens a row) and nemotron_h (Mamba-2, attention, MLP and MoE blocks): 24 runs within
# -12.3%..+16.5% (docs/plan-memory.md); as llama blocks the grid was 23-58% under.
# Routed experts (mlx-lm's SwitchGLU / SwitchMLP: the token gathered into expert order, gather_qmm
# on the packed experts, the adapters' gather_mm, the unsort and the routing weight), per token and
# expert it is routed to, besides the two LoRA inputs counted with the adapters (the gathered
# token, and the activation that down_proj reads): arrays of the expert width (gate and up, and
# the gradients of the gathered matmuls in flight; one less without a gate) and of the hidden width
# (down_proj's output before and after the unsort, and that times the routing weight).
EXPERT_INTER_ARRAYS = 3.0
EXPERT_HIDDEN_ARRAYS = 3.0
# A Mamba-2 mixer in training runs mlx-lm's chunked SSD scan (ssm.ssm_attn, chunks of SSM_CHUNK
# tokens). Per token it keeps SSM_CHUNK_ARRAYS float32 arrays of heads x min(width, chunk) (the
# chunk x chunk matrices: C @ B and the decay, exp of the segment sums of dt x A) and their
# gradient as work (SSM_WORK_ARRAYS), and SSM_WIDTH_ARRAYS arrays of the in_proj width
# (2 x inner + 2 x groups x state + heads: the projection, the convolution's output and SiLU, the
# gated norm's inputs). Rows longer than a chunk also carry the state from chunk to chunk, which
# a broadcasting matmul multiplies by every token's C: about SSM_STATE_COPIES float32 states a
# token of a chunk, one layer at a time (see estimate).
SSM_CHUNK = 256
SSM_CHUNK_ARRAYS = 2.0
SSM_WIDTH_ARRAYS = 2.5
SSM_WORK_ARRAYS = 1.0
SSM_STATE_COPIES = 0.75
# gemma3n blocks (Arch.altup, Arch.mlp_arrays), on top of the llama block's arrays. Fitted on the
# CPU (float32, 2026-12-06; least squares on the relative error, rounded) to
# `bench/memory.py --moe --only gemma3n` and 6 probes that vary one shape each (8 and 12 blocks,
# AltUp 2 and 4 streams, MLP 704 and 1,408, 4 x 256 to 1 x 1,024 tokens, checkpointed or not):
# 9 runs within -2.5%..+5.8%, and 2 held out +4.0% and +5.7% (docs/plan-memory.md); as llama
# blocks, every block checkpointed, they were 41-65% under.
# GELU_MLP_ARRAYS intermediate-sized arrays per token where a SwiGLU MLP keeps 3 (gemma3n's
# GELU is not recomputed as qlora.swiglu is, and its sparse layers add the cutoff's arrays), and
# ALTUP_ARRAYS hidden-sized arrays per AltUp stream (the streams' input, predictions and
# corrections).
GELU_MLP_ARRAYS = 7.0
ALTUP_ARRAYS = 4.0
# Gemma 4 blocks (gemma4_text: Arch.mlp_arrays, hidden_arrays, head_arrays, wide_mlp,
# per_layer_input), on top of the llama block's arrays. Fitted on the CPU (float32, 2026-12-06; the
# best of a grid of whole numbers by least squares on the relative error) to `bench/memory.py --moe
# --only gemma4` and 8 probes that vary one shape each (12 blocks, MLP 1,408, head_dim 128, hidden
# 512, per-layer inputs of 64 and 128 alone, double-width MLPs alone, no shared layers): 13 runs
# within -6.4%..+2.3%, and 2 held out (hidden 512, 10 blocks) +2.1% and +2.0% (docs/plan-memory.md);
# with only the KV-linked layers modelled (llama blocks otherwise) they were 20-44% under.
# GEGLU_MLP_ARRAYS intermediate-sized arrays per token where a SwiGLU MLP keeps 3 (mlx-lm's
# gelu_approx(gate) * up is differentiated through the tanh approximation's intermediates, not
# recomputed as qlora.swiglu is); a double-width MLP (Arch.wide_mlp) as many again.
# GEMMA4_HIDDEN_ARRAYS hidden-sized arrays beyond the llama block's two norm inputs (Gemma 4 has
# four norms around attention and MLP) and GEMMA4_HEAD_ARRAYS of the query width (the q, k and v
# norms and the global layers' wider heads). With per-layer inputs, PER_LAYER_ARRAYS arrays of
# their width per block (the gate, its GELU's intermediates, the product) and the model's
# per-layer inputs, layers x width a token, alive the whole step (each block reads its slice; a
# checkpointed block keeps it as an input); counted, not fitted.
GEGLU_MLP_ARRAYS = 6.0
GEMMA4_HIDDEN_ARRAYS = 2.0
GEMMA4_HEAD_ARRAYS = 2.0
PER_LAYER_ARRAYS = 6.0


def estimate(arch: Arch, run: Run) -> Breakdown:
    """The peak of one training step: the largest of the moments below, each the arrays alive then."""
    b = DTYPE_BYTES[run.dtype]
    n = _adapted_layers(arch, run)
    tokens = run.tokens
    lora = F32 * lora_parameter_count(arch, run)
    # AdamW's moments; the gradients appear as the backward pass frees activations, so they are
    # not part of the peak, but accumulated gradients (from earlier micro-batches) are
    optimizer = 2 * lora + (lora if run.accumulation > 1 else 0)
    saved, work = block_bytes(arch, run)
    # the block being worked on and those in flight: in a model of several kinds of block (MoE,
    # Mamba-2 hybrids) the peak comes at the heaviest (the same as the average otherwise)
    big, big_work = block_bytes(arch, run, heaviest=True)
    adapted = range(arch.layers - n, arch.layers)
    wide = _wide_mlp_bytes(arch, run)
    if wide and any(i in arch.wide_mlp for i in adapted):
        big += wide

    def kept_by(blocks) -> float:
        """Per-token bytes `blocks` keep when not recomputed: their saved arrays (Gemma 4's
        double-width MLPs' second half included)."""
        blocks = list(blocks)
        return len(blocks) * saved + wide * sum(i in arch.wide_mlp for i in blocks)
    fixed = dict(base_weights=base_weight_bytes(arch, run), lora_weights=lora, optimizer=optimizer,
                 overhead=OVERHEAD[run.device])
    # packed rows: one additive attention mask shared by every layer, alive for the whole step;
    # and the states of a Gated DeltaNet layer's backward pass, at every moment (one layer at a time)
    extra = run.batch * run.seq * run.seq * (F32 if run.device == "cpu" else b) if run.packed else 0
    if arch.recurrent_layers and run.device != "cuda":  # on CUDA: inside the work in flight (RECURRENCE_STATES)
        kept = 0 if run.checkpoint else RECURRENCE_KEPT * (arch.recurrent_layers - 1)
        extra += (RECURRENCE_STATES + kept) * F32 * arch.recurrent_state * tokens
    if run.seq > SSM_CHUNK and run.mixers:
        # rows longer than one chunk of the Mamba-2 scan: from the second chunk on, the state carried
        # in (heads x head_dim x state) is multiplied by every token's C through a broadcasting
        # matmul, whose broadcast operand (and in the backward pass the state's gradient before the
        # sum over tokens) is a state per token of the chunk, one layer at a time. Measured: 2 rows
        # of 512 against 4 of 256 (the same tokens, 2 Mamba-2 blocks of 8 x 64 x 64) 277 vs 218 MB.
        extra += SSM_STATE_COPIES * run.batch * SSM_CHUNK * F32 * max(m[6] for m in run.mixers)
    if arch.per_layer_input:
        # Gemma 4's per-layer inputs, every layer's slice of the model's array, for the whole step
        extra += arch.layers * arch.per_layer_input * b * tokens

    # On CUDA the work in flight spans up to IN_FLIGHT_BLOCKS (24) blocks, in a model of several
    # kinds of block many of each: the average block's share of the heaviest, not the heaviest
    # (Qwen3-Next's shape, 3 Gated DeltaNet blocks to 1 attention block, 1 x 1,024 on an H100:
    # +21% with the heaviest). The CPU and Metal run one or two blocks ahead: the heaviest.
    spread = (saved + work) / (big + big_work) if run.device == "cuda" and run.mixers else 1.0

    def moment(activations, logits, block, ahead):
        """`block`: per-token bytes of the block being worked on; `ahead`: per-token bytes of one
        block of the work in flight (see _in_flight)."""
        in_flight, elastic = _in_flight(arch, run, ahead * spread)
        return Breakdown(activations=activations + extra, logits=logits,
                         in_flight=block * tokens + in_flight, elastic=elastic, **fixed)

    if not run.checkpoint:
        # the start of the backward pass: every block's saved arrays and the loss's arrays
        return moment(kept_by(adapted) * tokens, _loss_bytes(arch, run), 0.0, big + big_work)
    # Gradient checkpointing keeps each block's input (in the compute dtype; Arch.stream); the
    # backward pass recomputes one block at a time. Blocks it leaves whole (gemma3n's and Gemma 4's KV-linked
    # layers, Arch.kv_linked: qlora.checkpoint_blocks) keep all their saved arrays, as without
    # checkpointing, until their backward pass has run. Measured on the CPU (bench/memory.py,
    # docs/plan-memory.md):
    whole = [i for i in adapted if i in arch.kv_linked]
    recomputed = [i for i in adapted if i not in arch.kv_linked]
    inputs = len(recomputed) * arch.stream * b * tokens
    kept = inputs + kept_by(whole) * tokens
    probs = _probs_bytes(arch, run) if attention_kind(arch, run) == "unfused" else 0.0
    loss = _loss_bytes(arch, run)
    if whole and whole[-1] == adapted[-1]:
        # the last block is whole (gemma3n's KV-shared layers are the last): the backward pass starts
        # as without checkpointing, nothing recomputed
        moments = [moment(kept, loss, 0.0, big + big_work)]
    else:
        # at the loss: the logits and the loss's arrays, the last block recomputed, and the run-ahead
        # of that recomputation (forward work: a block's arrays but its attention probabilities)
        moments = [moment(kept, loss, big, big - probs)]
    if recomputed:
        # block by block: the block being differentiated, and in flight both the recomputation and
        # the gradient work of the blocks after it; of the whole blocks only those below it are left
        below = [i for i in whole if i < recomputed[-1]]
        if run.device == "cpu" and probs:
            # On the CPU, attention unfused, the run-ahead does not hold a block's attention arrays
            # (heads x width^2 floats) per block it is ahead by: the peak holds 3 with MLX's
            # run-ahead off or one block, 4 with a next block to recompute, where this moment
            # counted 2 + 1.18 x 3 = 5.5 (CPU_ATTENTION_*_ARRAYS). The rest of the recomputation and
            # the gradient work stays IN_FLIGHT_BLOCKS ahead; one float32 logits-sized array
            # (_kept_logits) is alive too. In a hybrid model the attention arrays are taken as the
            # heaviest block's, as at the loss.
            ahead = CPU_ATTENTION_AHEAD_ARRAYS if len(recomputed) > 1 else 0  # a next block to recompute
            attention = (CPU_ATTENTION_BACKWARD_ARRAYS + ahead - 2) * probs  # big and big_work hold 2
            # in flight: two blocks' arrays and the work, less their 3 attention arrays
            moments.append(moment(inputs + kept_by(below) * tokens, _kept_logits(arch, run),
                                  big + big_work + attention, max(0.0, 2 * big + big_work - 3 * probs)))
        else:
            moments.append(moment(inputs + kept_by(below) * tokens, 0.0, big + big_work, 2 * big + big_work))
    if run.fused_update and not (run.device == "cpu" and run.flat_update):
        # With the gradient norm in the same compiled call as the backward pass, MLX computes the
        # gradients of the first block before those of the others: after its recomputation, every
        # block keeps the inputs of its LoRA layers (what the gradient of lora_a needs) until then,
        # instead of its own input, and the logits stay alive for the loss value, which is computed
        # last. On the CPU this doubles a checkpointed step of a 30-block model (SmolLM2 shape, 8k
        # vocabulary: 0.336 GB with the norm in a separate call, 0.654 GB fused), but only with the
        # update array by array: with the flat update (the trainer's; the norm is one reduction
        # over the concatenated gradients) the CPU computes the gradients block by block, last
        # block first, and each block's LoRA inputs go with its backward pass (16 blocks of hidden
        # 256, 4 x 256 tokens: 96.7 MB flat, 165.5 MB array by array; docs/plan-memory.md). On
        # CUDA the checkpointed runs with the flat update were fitted with this moment in place.
        lora_in = _lora_widths(arch, run)[0] * b
        # whole blocks (not recomputed) hold everything they saved, as in `kept`
        held = (len(recomputed) * max(arch.stream * b, lora_in) + kept_by(whole)) * tokens
        if run.device == "cuda":
            # CUDA keeps what the moment describes only as far as it runs ahead: at long context the
            # LoRA inputs held beyond the blocks' own inputs stop near CUDA_RUN_AHEAD (H100, 7B:
            # 8,192 to 32,768 positions measured 21.0-38.3 GB where the whole moment is 28.7-76.5;
            # docs/plan-memory.md). Up to about 4,096 positions the whole moment fits under it.
            held = min(held, kept + CUDA_RUN_AHEAD)
        moments.append(moment(held, _kept_logits(arch, run), big + big_work, big + big_work))
    return max(moments, key=lambda m: m.peak)


def _wide_mlp_bytes(arch: Arch, run: Run) -> float:
    """Per-token bytes a double-width MLP (Gemma 4's KV-shared layers, Arch.wide_mlp) keeps beyond
    the block_bytes of its block: the MLP's arrays again, its second intermediate_size."""
    return arch.mlp_arrays * arch.inter * DTYPE_BYTES[run.dtype] if arch.wide_mlp else 0.0


def _adapted_layers(arch: Arch, run: Run) -> int:
    return arch.layers if run.lora_layers in (-1, None) else min(run.lora_layers, arch.layers)


def lora_parameter_count(arch: Arch, run: Run) -> int:
    """Trainable parameters of the adapters: exactly what apply_lora creates (Run.lora), or for a
    synthetic Run, `keys` of MODULES in each adapted block."""
    if run.lora:
        from .model import lora_parameter_count as count

        return count(run.lora, run.rank)
    return _adapted_layers(arch, run) * sum(run.rank * sum(arch.shape(k)) for k in run.keys)


def _lora_widths(arch: Arch, run: Run) -> tuple[float, float]:
    """(inputs, rank columns) per token that one adapted block's LoRA layers keep for the backward
    pass: the width of each distinct input (q, k and v read one; layers of one module reading
    inputs of one width are taken to share it) and the rank-sized product x @ A of each layer. An
    expert layer's adapters see each token once per expert it is routed to. Averaged over the
    adapted blocks (hybrid models mix block kinds)."""
    if not run.lora:
        return sum({MODULES[k][2]: arch.dims[MODULES[k][0]] for k in run.keys}.values()), \
            run.rank * len(run.keys)
    inputs, columns = {}, 0
    for t in run.lora:
        copies = run.experts_per_token if t.experts else 1
        inputs[(t.block, t.key.rpartition(".")[0], t.d_in, copies)] = t.d_in * copies
        columns += run.rank * copies
    blocks = len({t.block for t in run.lora})
    return sum(inputs.values()) / blocks, columns / blocks


def attention_kind(arch: Arch, run: Run) -> str:
    """'fused': cuDNN attention forward and backward (bf16/fp16, head_dim a multiple of 8 up to
    128, width a multiple of 128); 'fused-forward': CUDA recomputes the backward unfused;
    'unfused': scores and probabilities are ordinary arrays (CPU, Metal training, float32)."""
    if run.device != "cuda" or DTYPE_BYTES[run.dtype] != 2 or arch.head_dim % 8 or arch.head_dim > 128:
        return "unfused"
    return "fused" if run.seq % 128 == 0 else "fused-forward"


def _probs_bytes(arch: Arch, run: Run) -> float:
    """Bytes per token of one batch x heads x width x width array (attention probabilities; on the
    CPU in float32), spread over the micro-batch's tokens. With a token budget the rows at the
    widest width are batch = budget // width, so the array is batch x heads x width^2 whatever the
    tokens of the budget are."""
    b = F32 if run.device == "cpu" else DTYPE_BYTES[run.dtype]
    return arch.heads * run.seq * b * (run.batch * run.seq) / run.tokens


def block_bytes(arch: Arch, run: Run, heaviest: bool = False) -> tuple[float, float]:
    """(saved, extra work) bytes per token of one adapted block's backward pass: for a model of
    several kinds of block (Run.mixers) their average, or with `heaviest` the block with the most.

    Saved for the backward pass: the two RMSNorm inputs (float32 on the CPU, whose RMSNorm computes
    in float32); each distinct LoRA input (in the compute dtype, or a float32 copy where the
    adapters promote it: Run.lora_input_f32); LoRA's rank-sized intermediates; the attention inputs
    and, unless fused, the softmax probabilities (heads x width per token); the MLP's gate and up
    (qlora.swiglu recomputes sigmoid(gate) in the backward pass instead of keeping it and
    silu(gate)), plus one intermediate-sized array for the gradients that pass has in flight
    (fitted on an H100, 7B shape: 4 x 1024 +11%, 1 x 2048 -1%, bench/RESULTS.md); gemma3n's GELU
    MLP keeps Arch.mlp_arrays of them instead of 3, and its AltUp streams ALTUP_ARRAYS
    hidden-sized arrays each; Gemma 4's GEGLU MLP keeps Arch.mlp_arrays (a double-width MLP's
    second half is added by `estimate`, _wide_mlp_bytes), its blocks Arch.hidden_arrays more
    hidden-sized and Arch.head_arrays query-sized arrays, and PER_LAYER_ARRAYS of the per-layer
    input's width.
    """
    b = DTYPE_BYTES[run.dtype]
    d = arch.dims
    cpu = run.device == "cpu"
    norms = 2 * d["hidden"] * (F32 if cpu else b)
    if arch.hidden_arrays or arch.head_arrays or arch.per_layer_input:  # Gemma 4's other arrays
        norms += (arch.hidden_arrays * d["hidden"] + arch.head_arrays * d["q"]) * (F32 if cpu else b) \
            + PER_LAYER_ARRAYS * arch.per_layer_input * b
    lb = F32 if run.lora_input_f32 else b
    lora = lb * sum(_lora_widths(arch, run))
    kind = attention_kind(arch, run)
    attn = d["q"] * b + 2 * d["kv"] * b
    work = 0.0
    if kind == "fused":
        attn += d["q"] * b + arch.heads * F32                 # output and log-sum-exp kept
    else:
        probs = _probs_bytes(arch, run)
        if kind == "unfused":                                 # kept; their gradient is work
            attn, work = attn + probs, probs
        else:                                                 # recomputed in the backward pass
            work = UNFUSED_ATTENTION_ARRAYS * probs
    if run.mixers:  # MoE, Mamba-2 and linear-attention models, block by block: the average, or the heaviest
        each = [(norms + lora + m[0] * attn + LINEAR_MIXER_ARRAYS * m[7] * b + mix[0], m[0] * work + mix[1])
                for m in run.mixers for mix in [_mixer_bytes(arch, run, m)]]
        if heaviest:
            return max(each, key=sum)
        return sum(e[0] for e in each) / len(each), sum(e[1] for e in each) / len(each)
    mlp = arch.mlp_arrays * d["inter"] * b
    altup = ALTUP_ARRAYS * arch.altup * d["hidden"] * b  # gemma3n's streams; 0 elsewhere
    return norms + lora + attn + mlp + altup, work


def _mixer_bytes(arch: Arch, run: Run, mixer: tuple) -> tuple[float, float]:
    """(saved, extra work) bytes per token one block of a MoE or Mamba-2 model keeps besides its norms, LoRA and
    attention arrays (Run.mixers): its dense MLP as a llama MLP (3 arrays of its width), the routed
    experts' arrays (EXPERT_*_ARRAYS, per expert a token is routed to; a non-gated expert MLP has
    one array of the expert width less) and a Mamba-2 mixer's (SSM_*)."""
    _, dense, expert, expert_in, heads, width = mixer[:6]
    b = DTYPE_BYTES[run.dtype]
    saved, work = 3 * dense * b, 0.0
    if expert:
        arrays = EXPERT_INTER_ARRAYS - (2 - expert_in)
        saved += run.experts_per_token * (arrays * expert + EXPERT_HIDDEN_ARRAYS * arch.hidden) * b
    if heads:
        chunk = heads * min(run.seq, SSM_CHUNK) * F32
        saved += SSM_CHUNK_ARRAYS * chunk + SSM_WIDTH_ARRAYS * width * b
        work += SSM_WORK_ARRAYS * chunk
    return saved, work


def _in_flight(arch: Arch, run: Run, block: float) -> tuple[float, float]:
    """(bytes, elastic part) of the work MLX has dispatched but not finished (module docstring):
    IN_FLIGHT_BLOCKS blocks of `block` bytes per token; on CUDA that many of the 7B block's
    (cuda_block_share of them), at most CUDA_RUN_AHEAD bytes (plus, with compute=dequant, the
    dequantized weights of CUDA_DEQUANT_BLOCKS blocks, as many fewer), and the kernels'
    temporaries."""
    if run.device != "cuda":
        return IN_FLIGHT_BLOCKS[run.device] * block * run.tokens, 0.0
    share = cuda_block_share(arch, run)
    # never under the blocks MLX cannot do without (below): a small model's blocks are many
    # operations for little matmul work, so its queue is at least those
    total = max(share * IN_FLIGHT_BLOCKS["cuda"], CUDA_MIN_BLOCKS) * block * run.tokens
    limit = CUDA_RUN_AHEAD
    if run.compute == "dequant":
        limit += share * CUDA_DEQUANT_BLOCKS * _dequantized_block_bytes(arch, run)
    total = min(total, limit) + CUDA_TEMPORARIES
    # MLX stops dispatching when its memory limit is reached; about two blocks of work in flight
    # is what it cannot do without.
    return total, max(0.0, total - CUDA_MIN_BLOCKS * block * run.tokens - CUDA_TEMPORARIES)


def cuda_block_share(arch: Arch, run: Run) -> float:
    """The share of the 7B block's CUDA run-ahead (IN_FLIGHT_BLOCKS, CUDA_DEQUANT_BLOCKS) one
    adapted block gets: its linear layers' weights (every expert's) over CUDA_REFERENCE_BLOCK's,
    at most 1. The weights are the matmul work a block does per token; the host's work to record
    the block does not shrink with them, so a lighter block lets the host get less far ahead."""
    return min(1.0, block_weights(arch, run) / CUDA_REFERENCE_BLOCK)


def block_weights(arch: Arch, run: Run) -> float:
    """The weights of one adapted block's linear layers (the ones load_base quantizes, every
    expert of a MoE layer included; Run.weights), averaged over the adapted blocks; for a
    synthetic shape (no Run.weights), the llama block of MODULES, adapted or not."""
    adapted = range(arch.layers - _adapted_layers(arch, run), arch.layers)
    per_block = {}
    for path, n, _, kind in run.weights:
        index = _block_index(path) if kind == "layer" else None
        if index is not None and index in adapted:
            per_block[index] = per_block.get(index, 0) + n
    if not per_block:
        return float(sum(math.prod(arch.shape(k)) for k in MODULES))
    return sum(per_block.values()) / len(per_block)


def _block_index(path: str) -> int | None:
    """The block a weight's path is in ("model.layers.3.mlp.up_proj.weight": 3), or None."""
    parts = path.split(".")
    for name, index in zip(parts, parts[1:]):
        if name == "layers" and index.isdigit():
            return int(index)
    return None


def _dequantized_block_bytes(arch: Arch, run: Run) -> float:
    """A block's quantized weights dequantized to the compute dtype (compute=dequant)."""
    return DTYPE_BYTES[run.dtype] * sum(math.prod(arch.shape(k)) for k in MODULES
                                        if _quantized(arch, run, f"model.layers.0.{k}", arch.shape(k)[0]))


def _loss_bytes(arch: Arch, run: Run) -> float:
    """The final norm's input, the logits and the loss's arrays (of one chunk when chunked), and
    with compute=dequant the output layer's weight dequantized for its matmul."""
    b = DTYPE_BYTES[run.dtype]
    tokens = min(run.tokens, run.loss_chunk) if run.loss_chunk else run.tokens
    total = arch.hidden * (F32 if run.device == "cpu" else b) * run.tokens
    if run.device == "cpu" and run.loss_chunk:
        # Not one chunk's arrays at a time: on the CPU several chunks' float32 logits and softmax
        # gradients are alive at once (the chain of chunks orders their results, and MLX still
        # allocates ahead of it). Measured with mx.get_peak_memory around real steps, a step of n
        # chunks holds about n + 3 chunks' logits, at most 13 (262k vocabulary, 128-token chunks:
        # 3 chunks 6, 6 chunks 7.3, 9 chunks 8, 12 and 24 chunks 13; tests/test_token_ids.py)
        chunks = -(-run.tokens // run.loss_chunk)
        return total + min(chunks + CHUNKS_AHEAD_CPU, CHUNKS_ALIVE_CPU) * F32 * arch.vocab * tokens + \
            _dequant_head(arch, run)
    if run.device == "cpu":
        per_vocab = LOSS_ARRAYS["cpu"] * F32 + (2 * b if b != F32 else 0)
    else:
        per_vocab = LOSS_ARRAYS[run.device] * b
    total += per_vocab * arch.vocab * tokens
    return total + _dequant_head(arch, run)


def _dequant_head(arch: Arch, run: Run) -> float:
    """With compute=dequant, the output layer's weight dequantized for its matmuls (compute dtype).
    The chunked loss makes one copy per call, which every chunk's matmul, forward and backward,
    shares (loss.chunked_cross_entropy, qlora.dense_weight): exactly one. Unchunked, the forward's
    copy and the backward's own: DEQUANT_HEAD_COPIES, measured."""
    head = "model.embed_tokens" if arch.tied else "lm_head"
    if run.compute == "dequant" and _quantized(arch, run, head, arch.hidden):
        copies = 1 if run.loss_chunk else DEQUANT_HEAD_COPIES
        return copies * arch.vocab * arch.hidden * DTYPE_BYTES[run.dtype]
    return 0.0


def _kept_logits(arch: Arch, run: Run) -> float:
    """The logits kept for the loss value (one chunk's when the loss is chunked): float32 on the
    CPU, the compute dtype on a GPU."""
    tokens = min(run.tokens, run.loss_chunk) if run.loss_chunk else run.tokens
    return arch.vocab * tokens * (F32 if run.device == "cpu" else DTYPE_BYTES[run.dtype])


def base_weight_bytes(arch: Arch, run: Run) -> float:
    """The frozen base as the trainer holds it. Floating tensors are cast to the compute dtype; a
    float base is quantized on load (every linear layer whose input size the group divides; the
    embedding, tied output layer or not, stays float); a stored-quantized base is kept as stored."""
    b = DTYPE_BYTES[run.dtype]
    if run.weights:
        return sum(_tensor_bytes(arch, run, *w) for w in run.weights)
    total = (2 * arch.layers + 1) * arch.hidden * b          # RMSNorm weights
    names = [(f"model.layers.{i}.{k}", arch.shape(k)) for i in range(arch.layers) for k in MODULES]
    names.append(("model.embed_tokens", (arch.hidden, arch.vocab)))
    if not arch.tied:
        names.append(("lm_head", (arch.hidden, arch.vocab)))
    for path, (d_in, d_out) in names:
        q = _quantized(arch, run, path, d_in)
        n = d_in * d_out
        total += n * q[0] / 8 + 2 * n / q[1] * b if q else n * b
    return total


def _tensor_bytes(arch: Arch, run: Run, path: str, n: int, d_in: int, kind: str) -> float:
    """Bytes of one weight of the skeleton (Run.weights) as the trainer holds it: a stored-quantized
    layer or embedding as its config says (where the group divides its input, as mlx-lm quantized
    it), a float base's layers quantized on load (model.quantized_on_load), the rest in the
    compute dtype."""
    b = DTYPE_BYTES[run.dtype]
    q = arch.quantization
    if kind != "float" and q is not None:
        v = q.get(path[:-len(".weight")], q)
        bits_group = (v["bits"], v["group_size"]) if v and d_in % v["group_size"] == 0 else None
    elif kind == "layer" and run.bits and d_in % run.group_size == 0:
        bits_group = run.bits, run.group_size
    else:
        bits_group = None
    if not bits_group:
        return n * b
    bits, group = bits_group
    return n * bits / 8 + 2 * n / group * b


def _quantized(arch: Arch, run: Run, path: str, d_in: int) -> tuple[int, int] | None:
    """(bits, group size) the tensor at `path` is held in, or None for float."""
    q = arch.quantization
    if q is not None:
        v = q.get(path, q)
        return (v["bits"], v["group_size"]) if v else None
    if run.bits and path != "model.embed_tokens" and d_in % run.group_size == 0:
        return run.bits, run.group_size
    return None


# --------------------------------------------------------------------------- the device

def device_memory(device: str) -> tuple[float, str]:
    """(bytes the run may use, where that number comes from)."""
    if device == "cpu":
        return _system_memory()
    try:
        import mlx.core as mx
        info = mx.device_info()
    except Exception:  # noqa: BLE001  (no GPU here: planning for another machine)
        return 0.0, "no such device here: pass --memory-gb"
    if device == "metal" and info.get("max_recommended_working_set_size"):
        return float(info["max_recommended_working_set_size"]), "Metal's recommended working set"
    total = info.get("total_memory") or info.get("memory_size") or 0
    return float(total), f"{info.get('device_name', device)} memory"


def _system_memory() -> tuple[float, str]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0, "system memory available now"
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "system memory"
    except (ValueError, OSError, AttributeError):
        return 0.0, "system memory unknown: pass --memory-gb"


# --------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    arch: Arch
    run: Run
    breakdown: Breakdown
    available: float
    memory_source: str
    data: dict | None
    fits: bool
    largest_batch: int            # rows at this width, as configured (checkpointing or not)
    largest_batch_checkpointed: int
    longest_seq: int              # padded width that fits at this batch size (or token budget); 0: none
    recommendation: dict
    largest_batch_tokens: int = 0               # --batch-tokens: the largest budget that fits
    largest_batch_tokens_checkpointed: int = 0

    def as_json(self) -> dict:
        b = self.breakdown
        return {
            "predicted_peak_gb": round((b.peak + b.overhead) / GB, 3),
            "required_gb": round(b.required / GB, 3),
            "mlx_peak_gb": round(b.peak / GB, 3),
            "available_gb": round(self.available / GB, 3),
            "fits": self.fits,
            "breakdown_gb": {k: round(v / GB, 4) for k, v in asdict(b).items()},
            "device": self.run.device, "dtype": self.run.dtype, "compute": self.run.compute,
            "batch_size": self.run.batch, "seq_width": self.run.seq, "tokens": self.run.tokens,
            "batch_tokens": self.run.token_budget or None,
            "grad_checkpoint": self.run.checkpoint, "attention": attention_kind(self.arch, self.run),
            "largest_batch": self.largest_batch,
            "largest_batch_with_checkpointing": self.largest_batch_checkpointed,
            "largest_batch_tokens": self.largest_batch_tokens or None,
            "largest_batch_tokens_with_checkpointing": self.largest_batch_tokens_checkpointed or None,
            "longest_seq": self.longest_seq,
            "recommendation": self.recommendation,
            "model": asdict(self.arch), "data": self.data, "memory_source": self.memory_source,
        }


def run_from_config(cfg, arch: Arch, lengths=None, device: str | None = None,
                    model_config: dict | None = None) -> tuple[Run, dict | None]:
    """The Run of the largest micro-batch `cfg` will train on, and the data statistics used.
    With `model_config` the adapters and weights are the model's (from_skeleton); without, the
    llama-style `keys` of MODULES (a synthetic shape).

    Packed (the default): the call of the batch_size longest examples as batching.call_layout lays
    it out (packed_call). Unpacked, by example count: batch_size rows as wide as the longest
    example; by token budget (batch_tokens): batch_tokens tokens, and for what depends on the
    width (attention's width x width arrays) the longest example's width with batch_tokens //
    width rows."""
    import mlx.core as mx

    from .backend import device_kind
    from .qlora import resolve_mode
    from .step import fuses_update

    device = device or device_kind()
    world = mx.distributed.init().size()  # 1 unless launched by mlx.launch
    m, t = cfg.model, cfg.training
    dtype = m.dtype if m.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    longest, stats = cfg.data.max_seq_length, None
    if lengths is not None and len(lengths):
        lengths = sorted(int(x) for x in lengths)
        longest = min(lengths[-1], cfg.data.max_seq_length)
        stats = {"examples": len(lengths), "longest": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
                 "p95": lengths[int(0.95 * (len(lengths) - 1))]}
    if model_config is not None:
        try:
            skeleton = from_skeleton(model_config, cfg.lora)
        except UserError as e:  # name the model the config came from
            raise UserError(f"{cfg.model.path}: {e}") from None
        keys = tuple(dict.fromkeys(t.key for t in skeleton["lora"]))
    else:
        skeleton, keys = {}, tuple(cfg.lora.target_modules) or tuple(MODULES)
        unknown = [k for k in keys if k not in MODULES]
        if unknown:
            raise UserError(f"lora.target_modules: the planner knows {', '.join(MODULES)}; "
                            f"{', '.join(unknown)} is not one of them")
    batch = t.batch_size
    # one example a row, padded as Step.arrays pads it (to a power of two: Step.bucket_rows)
    seq = row_width(longest, device, getattr(t, "method", "sft") == "sft" and buckets_rows(device, t.batch_tokens))
    # the trainer's test (setup.apply_compute_options), at the widest row it could lay out
    packs = t.pack and _packable(model_config, width_bucket(max(row_target(device), cfg.data.max_seq_length), device))
    if packs:  # the largest call: the batch's longest examples, laid out as the step lays them out
        rows, seq = packed_call(lengths or [], longest, t.batch_size, t.batch_tokens, device,
                                skeleton.get("pair", 0.0), min_width(device, skeleton.get("params", 0)))
        batch = len(rows)
    run = Run(batch=batch, seq=seq, checkpoint=t.grad_checkpoint, packed=packs,
              examples=t.batch_size if packs else 0,
              rank=cfg.lora.rank, keys=keys, lora_layers=cfg.lora.num_layers, **skeleton,
              bits=None if m.quantize == "none" else int(m.quantize), group_size=m.group_size,
              dtype=dtype, compute=resolve_mode(m.compute, device), device=device,
              accumulation=t.grad_accumulation,
              loss_chunk=_loss_chunk(arch, model_config, t.chunked_ce),
              fused_update=fuses_update(world))
    if getattr(t, "batch_tokens", None) and not packs:
        run = _at_budget(run, t.batch_tokens)
    return run, stats


def _packable(model_config: dict | None, width: int) -> bool:
    """Whether the trainer packs this model's rows (packing.why_not_packable on the model built
    from its config, nothing computed); a synthetic shape (no config) packs."""
    if not model_config:
        return True
    from .model import model_skeleton
    from .packing import why_not_packable

    try:
        return why_not_packable(model_skeleton(model_config), width) is None
    except Exception:  # noqa: BLE001  (a config mlx-lm cannot build is reported by from_skeleton)
        return True


def _loss_chunk(arch: Arch, model_config: dict | None, setting: str) -> int:
    """The trainer's loss chunk (loss.loss_chunk) for this model: asked of mlx-lm's model built
    from the config without weights, frozen as the trainer's base is; a synthetic shape (no
    config) is taken as splittable."""
    from .loss import ce_chunk, loss_chunk

    if not model_config:
        return ce_chunk(arch.vocab, setting)
    from .model import model_skeleton

    try:
        skeleton = model_skeleton(model_config)
    except Exception:  # noqa: BLE001  (from_skeleton reports a config mlx-lm cannot build)
        return ce_chunk(arch.vocab, setting)
    skeleton.freeze()
    return loss_chunk(skeleton, setting)


def packed_call(lengths, longest: int, batch_size: int, batch_tokens: int | None, device: str,
                pair: float = 0.0, floor: int = 128):
    """(rows, width) of the largest packed call: batching.call_layout of the `batch_size` longest
    examples (every example `longest` tokens when the lengths are not known), or under a token
    budget of as many of the longest as the budget holds; `pair`, `floor`: Run.pair, Run.floor."""
    lengths = sorted((min(int(x), longest) for x in lengths), reverse=True) or [longest] * batch_size
    if batch_tokens:
        take, used = [], 0
        for n in lengths:
            if take and used + n - 1 > batch_tokens:
                break
            take.append(n)
            used += n - 1
    else:
        take = lengths[:batch_size]
    rows, width, _ = call_layout(take, row_target(device), device, pair, floor)
    return rows, width


def from_skeleton(model_config: dict, lcfg) -> dict:
    """Run's fields that come from the model itself, found in mlx-lm's model built from the config
    without weights (model.model_skeleton): the layers apply_lora will adapt (model.lora_targets),
    the experts each token is routed to, and every weight (Run.weights). Remembered per config and
    LoRA setting: the planner's searches ask again for each batch size they try."""
    return _from_skeleton(json.dumps(model_config, sort_keys=True), tuple(lcfg.target_modules), lcfg.num_layers)


@functools.lru_cache(maxsize=8)
def _from_skeleton(config_json: str, target_modules: tuple, num_layers: int) -> dict:
    from .config import LoraConfig
    from .model import lora_targets, model_skeleton, quantized_on_load

    model_config = json.loads(config_json)
    lcfg = LoraConfig(target_modules=list(target_modules), num_layers=num_layers)
    try:
        skeleton = model_skeleton(model_config)
    except Exception as e:  # noqa: BLE001  (mlx-lm's model classes raise many types on a bad config)
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"its config: mlx-lm cannot build model type {model_config.get('model_type')!r} "
                        f"from it ({type(e).__name__}: {first}); check the model's config.json") from None
    c = dict(model_config.get("text_config") or {}, **model_config)
    per_token = next((c[k] for k in ("num_experts_per_tok", "moe_topk", "top_k")
                      if isinstance(c.get(k), int)), 1)
    weights = []
    for path, m in skeleton.named_modules():
        own = {k: v for k, v in m.parameters().items() if not isinstance(v, (dict, list))}
        for name, w in own.items():
            full = f"{path}.{name}" if path else name
            kind = "float"
            if name == "weight" and quantized_on_load(m, 1):
                kind = "layer"
            elif name == "weight" and hasattr(m, "to_quantized"):
                kind = "embedding"
            weights.append((full, w.size, w.shape[-1], kind))
    lora = tuple(lora_targets(skeleton, lcfg))
    mixers = tuple(model_mixers(skeleton.layers[i], c["hidden_size"]) for i in sorted({t.block for t in lora}))
    if not any(m[2] or m[4] or m[7] for m in mixers):  # no experts, Mamba-2 or linear mixer: llama-style
        mixers = ()
    from .step import attention_pair_cost, model_parameters

    return {"lora": lora, "experts_per_token": per_token, "weights": tuple(weights), "mixers": mixers,
            "pair": attention_pair_cost(skeleton), "params": model_parameters(skeleton)}


def model_mixers(block, hidden: int) -> tuple:
    """Run.mixers' entry of one block of mlx-lm's model: (attention 0/1, dense MLP width, routed
    experts' width, expert layers reading the input, Mamba-2 heads, Mamba-2 in_proj width, Mamba-2
    state elements: heads x head_dim x state size, linear mixer width). A block with another token
    mixer (Gated DeltaNet, a short convolution) is a linear mixer, of the width its input
    projections make (Gated DeltaNet's q, k, v, z, b and a; the convolution's B, C and x): it keeps
    LINEAR_MIXER_ARRAYS arrays of that width a token and no heads x width^2 arrays (the
    recurrence's states are counted apart, RECURRENCE_STATES). An MLP's width is the input width
    of its layer that writes the hidden size back."""
    import mlx.nn as nn

    attention = dense = expert = expert_in = heads = width = state = other = 0
    for _, m in block.named_modules():
        kind = type(m).__name__
        children = {k: v for k, v in m.children().items() if isinstance(v, nn.Module)}
        switch = {k: v for k, v in children.items() if hasattr(v, "num_experts") and hasattr(v, "input_dims")}
        if hasattr(m, "ssm_state_size") and hasattr(m, "in_proj"):
            heads, width = m.num_heads, m.in_proj.weight.shape[0]
            state = m.num_heads * m.head_dim * m.ssm_state_size
        elif "Attention" in kind:
            attention = 1
        elif switch:  # SwitchGLU (gate, up, down) or SwitchMLP (fc1, fc2): the last one reads the width
            named = [switch[k] for k in ("down_proj", "fc2") if k in switch]
            last = named[0] if named else min(switch.values(), key=lambda v: v.output_dims)
            expert = last.input_dims
            expert_in = len(switch) - 1
        elif "MLP" in kind or "FeedForward" in kind:
            out = [v for v in children.values() if _out_width(v) == hidden]
            dense += max((_in_width(v) for v in out), default=0)
        elif hasattr(m, "A_log") or hasattr(m, "conv"):
            # a linear mixer: the widths its projections make of the block's input
            other += sum(_out_width(v) for k, v in children.items()
                         if k != "out_proj" and _out_width(v) and _in_width(v) == hidden)
    return (1 if attention else 0, dense, expert, expert_in, heads, width, state,
            other if not heads and not attention else 0)


def _out_width(m) -> int:
    w = getattr(m, "weight", None)
    return w.shape[0] if w is not None and w.ndim == 2 else 0


def _in_width(m) -> int:
    import mlx.core as mx

    w = m.weight
    bits = getattr(m, "bits", None)
    return w.shape[1] * 32 // bits if bits and w.dtype == mx.uint32 else w.shape[1]


def _at_budget(run: Run, budget: int, **change) -> Run:
    """`run` with micro-batches of up to `budget` tokens: `budget // width` rows at the widest
    width (at least one: an example wider than the budget gets a micro-batch of its own)."""
    run = replace(run, **change)
    return replace(run, token_budget=budget, batch=max(1, budget // run.seq))


def _at_width(run: Run, width: int) -> Run:
    """`run` with its longest example `width` wide (rows recounted under a token budget)."""
    return _at_budget(run, run.token_budget, seq=width) if run.token_budget else replace(run, seq=width)


def make_plan(cfg, model_cfg: dict | None = None, lengths=None, device: str | None = None,
              memory_gb: float | None = None) -> Plan:
    from .model import gguf_requant

    if model_cfg is None:
        model_cfg = read_model_config(cfg.model.path, requant=gguf_requant(cfg.model))
    arch = arch_from_config(model_cfg)
    run, stats = run_from_config(cfg, arch, lengths, device, model_cfg)
    if memory_gb:
        available, source = memory_gb * GB, "--memory-gb"
    else:
        available, source = device_memory(run.device)
    fits_at = lambda r: not available or estimate(arch, r).required <= available  # noqa: E731
    br = estimate(arch, run)
    extra = {}
    if run.token_budget:
        # budgets of whole rows at the widest width
        def rows(ckpt):
            return _largest(lambda x: fits_at(_at_budget(run, x * run.seq, checkpoint=ckpt)))

        largest, largest_ck = rows(run.checkpoint), rows(True)
        extra = dict(largest_batch_tokens=largest * run.seq,
                     largest_batch_tokens_checkpointed=largest_ck * run.seq)
        limit = max(1, run.token_budget // 32)   # no example is wider than the budget
    elif run.packed:  # examples per call, each count laid out as the trainer lays it out
        cap = len(lengths) if lengths is not None and len(lengths) else 1 << 16
        largest = _largest(lambda x: fits_at(_packed_at(run, x, lengths, cfg.data.max_seq_length)), cap)
        largest_ck = _largest(lambda x: fits_at(_packed_at(run, x, lengths, cfg.data.max_seq_length,
                                                           checkpoint=True)), cap)
        limit = 4096
    else:
        largest = _largest(lambda x: fits_at(_at_batch(run, x)))
        largest_ck = _largest(lambda x: fits_at(_at_batch(run, x, checkpoint=True)))
        limit = 4096                             # max_seq_length 128k
    x = _largest(lambda x: fits_at(_at_width(run, padded_width(32 * x, run.device))), limit)
    longest = padded_width(32 * x, run.device) if x else 0
    plan = Plan(arch, run, br, available, source, stats, fits_at(run), largest, largest_ck, longest, {},
                **extra)
    plan.recommendation = _recommend(plan, cfg)
    return plan


def _packed_at(run: Run, examples: int, lengths, max_seq: int, **change) -> Run:
    """`run` packed with `examples` examples a call (the longest ones, packed_call) and the
    accumulation that keeps its examples per optimizer step."""
    lens = [int(x) for x in lengths] if lengths is not None and len(lengths) else []
    longest = min(max(lens), max_seq) if lens else max_seq
    rows, width = packed_call(lens, longest, examples, None, run.device, run.pair, run.floor)
    return replace(run, batch=len(rows), seq=width, examples=examples,
                   accumulation=math.ceil(run.examples * run.accumulation / examples), **change)


def _at_batch(run: Run, batch: int, **change) -> Run:
    """`run` at another batch size, with the accumulation that keeps its effective batch."""
    return replace(run, batch=batch, accumulation=math.ceil(run.batch * run.accumulation / batch), **change)


def _largest(ok, limit: int = 1 << 16) -> int:
    """The largest x in [1, limit] with ok(x), for a monotone ok; 0 if none."""
    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _recommend(plan: Plan, cfg) -> dict:
    """Settings that fit and keep the effective batch (batch x accumulation, or tokens per
    optimizer step under a token budget): the largest batch that fits as configured, else with
    gradient checkpointing, else a shorter max_seq_length."""
    run = plan.run
    if run.packed:  # in examples: the rows of a packed call follow from them
        run = replace(run, batch=run.examples)
    keep = {"batch_size": run.batch, "grad_accumulation": run.accumulation,
            "grad_checkpoint": run.checkpoint, "max_seq_length": cfg.data.max_seq_length,
            "batch_tokens": run.token_budget or None}
    if plan.fits:
        return dict(keep, text="fits as configured")
    if run.token_budget:
        return _recommend_budget(plan, cfg, keep)
    effective = run.batch * run.accumulation
    for ckpt, largest in ((run.checkpoint, plan.largest_batch), (True, plan.largest_batch_checkpointed)):
        if largest >= 1:
            batch = _batch_for(effective, min(largest, run.batch))
            accum = math.ceil(effective / batch)
            flags = [f"--batch-size {batch}", f"--grad-accumulation {accum}"] if batch < run.batch else []
            flags += ["--grad-checkpoint true"] if ckpt and not run.checkpoint else []
            note = ("" if batch == run.batch else f" (effective batch {batch * accum}"
                    + (")" if batch * accum == effective else f", was {effective})"))
            return dict(keep, batch_size=batch, grad_accumulation=accum, grad_checkpoint=ckpt,
                        text=" ".join(flags) + note)
    seq = _fitting_length(plan)
    if seq:
        return dict(keep, batch_size=1, grad_accumulation=effective, grad_checkpoint=True, max_seq_length=seq,
                    text=f"--batch-size 1 --grad-accumulation {effective} --grad-checkpoint true "
                         f"--max-seq-length {seq}")
    return dict(keep, batch_size=0, grad_accumulation=0, grad_checkpoint=True, max_seq_length=0,
                text="the model alone does not fit this device: use a smaller model or a larger device")


def _recommend_budget(plan: Plan, cfg, keep: dict) -> dict:
    """_recommend under --batch-tokens: a smaller token budget (at least max_seq_length, which the
    config requires) with the accumulation that keeps the tokens per optimizer step."""
    run = plan.run
    effective = run.token_budget * run.accumulation
    for ckpt, largest in ((run.checkpoint, plan.largest_batch_tokens),
                          (True, plan.largest_batch_tokens_checkpointed)):
        budget = min(largest, run.token_budget)
        if budget >= cfg.data.max_seq_length:
            accum = math.ceil(effective / budget)
            smaller = budget < run.token_budget
            flags = [f"--batch-tokens {budget}", f"--grad-accumulation {accum}"] if smaller else []
            flags += ["--grad-checkpoint true"] if ckpt and not run.checkpoint else []
            note = ("" if budget == run.token_budget else f" (up to {budget * accum} tokens a step"
                    + (")" if budget * accum == effective else f", was {effective})"))
            return dict(keep, batch_size=max(1, budget // run.seq), batch_tokens=budget,
                        grad_accumulation=accum, grad_checkpoint=ckpt, text=" ".join(flags) + note)
    seq = _fitting_length(plan)
    if seq:
        accum = math.ceil(effective / seq)
        return dict(keep, batch_size=1, batch_tokens=seq, grad_accumulation=accum, grad_checkpoint=True,
                    max_seq_length=seq, text=f"--batch-tokens {seq} --max-seq-length {seq} "
                                             f"--grad-accumulation {accum} --grad-checkpoint true")
    return dict(keep, batch_size=0, batch_tokens=0, grad_accumulation=0, grad_checkpoint=True,
                max_seq_length=0,
                text="the model alone does not fit this device: use a smaller model or a larger device")


def _batch_for(effective: int, largest: int) -> int:
    """The largest batch <= `largest` that divides the effective batch exactly (so accumulation
    keeps it), unless that would more than halve the batch."""
    divisor = next(b for b in range(largest, 0, -1) if effective % b == 0)
    return divisor if 2 * divisor >= largest else largest


def _fitting_length(plan: Plan) -> int:
    """The longest max_seq_length (a multiple of 32) that fits one example a micro-batch with
    checkpointing (0 if none); under a token budget, with the budget equal to it."""
    arch, run = plan.arch, replace(plan.run, batch=1, checkpoint=True, token_budget=0)

    def ok(x):
        width = padded_width(32 * x, run.device)
        r = replace(run, seq=width, token_budget=32 * x if plan.run.token_budget else 0)
        return estimate(arch, r).required <= plan.available

    return 32 * _largest(ok, 4096)  # max_seq_length 128k


def check_fits(cfg, model_config: dict | None = None, data_stats=None, source=None,
               quiet: bool = False) -> Plan | None:
    """The plan of `cfg`; raises UserError with the recommendation when it is predicted not to fit,
    unless training.force.

    model_config: the model's config dict (None: read from cfg.model.path, no weights loaded).
    data_stats: token lengths of the training examples (None: tokenize cfg.data.path with the
    model's tokenizer; where that cannot be done without the weights, every micro-batch is
    assumed to be max_seq_length long). Returns None, with a note, for a Hub model that is not
    downloaded yet (its config is not here to plan with). source: model.resolve_source's answer
    for cfg.model.path, where the caller has it. quiet: return a plan that does not fit instead of
    raising."""
    if model_config is None:
        try:
            from .model import gguf_requant

            model_config = read_model_config(cfg.model.path, source, gguf_requant(cfg.model))
        except UserError as e:
            if (source[0] == "hub" if source else _is_hub(cfg.model.path)):  # loading will download it; plan with it then
                print(f"note: memory not planned before loading ({e})", file=sys.stderr)
                return None
            raise
    if data_stats is None:
        data_stats = data_lengths(cfg)
    plan = make_plan(cfg, model_config, data_stats)
    if plan.fits or cfg.training.force or quiet:
        return plan
    raise UserError(f"memory: this run is predicted to need {plan.breakdown.required / GB:.1f} GB but "
                    f"{plan.available / GB:.1f} GB is available ({plan.memory_source}); "
                    f"try: {plan.recommendation['text']} (see `steadytune plan`), or pass --force to try anyway")


def advice(cfg) -> str:
    """One sentence for an out-of-memory message: the planner's recommendation."""
    try:
        plan = make_plan(cfg, lengths=data_lengths(cfg))
    except UserError:
        return ("lower --batch-size (raise --grad-accumulation to keep the effective batch), lower "
                "--max-seq-length, or add --grad-checkpoint true")
    r, run = plan.recommendation, plan.run
    if not plan.fits:
        return f"try: {r['text']}"
    # predicted to fit, yet it did not: the next step down
    ckpt = "" if run.checkpoint else " or --grad-checkpoint true"
    expected = f"the planner expected {plan.breakdown.required / GB:.1f} GB"
    if run.token_budget:
        half = max(cfg.data.max_seq_length, run.token_budget // 2)
        if half >= run.token_budget:
            return f"{expected}; try --grad-checkpoint true or a shorter --max-seq-length"
        return (f"{expected}; try --batch-tokens {half} --grad-accumulation "
                f"{math.ceil(run.token_budget * run.accumulation / half)}{ckpt}")
    half = max(1, run.batch // 2)
    return (f"{expected}; try --batch-size {half} "
            f"--grad-accumulation {math.ceil(run.batch * run.accumulation / half)}{ckpt}")


def data_lengths(cfg):
    """Token lengths of the training examples, with the model's tokenizer (None without --data or
    when the tokenizer cannot be loaded without the weights)."""
    if not cfg.data.path:
        return None
    from .data import check_template, load_splits, tokenize_all

    splits = load_splits(cfg.data.path, cfg.data.valid_fraction, cfg.training.seed, cfg.data.max_examples)
    tokenizer = _tokenizer(cfg.model.path)
    if tokenizer is None:
        return None
    check_template(splits, tokenizer, cfg.data)  # system turns folded as train folds them; template errors named
    # the longest tokenized length decides the plan: measure them untruncated
    tok = tokenize_all(splits.train, tokenizer, max_seq_length=1 << 30, train_on_prompt=True)
    return tok.lengths().tolist()


def _tokenizer(path: str):
    """The model's tokenizer without its weights; None for a Hub id (plan does not download)."""
    from .model import resolve_source, source_tokenizer

    source = resolve_source(path)
    return None if source[0] == "hub" else source_tokenizer(path, source)


def render(plan: Plan, cfg) -> str:
    a, r, b = plan.arch, plan.run, plan.breakdown
    quant = ("stored quantized" if a.quantization else f"{r.bits}-bit g{r.group_size}" if r.bits else "float")
    rows = [("base weights (" + quant + ")", b.base_weights), ("LoRA weights", b.lora_weights),
            ("optimizer state", b.optimizer),
            ("activations" + (" (checkpointed)" if r.checkpoint else ""), b.activations),
            ("logits and loss", b.logits), ("in flight (MLX runs ahead)", b.in_flight),
            ("framework overhead", b.overhead)]
    data = (f"{plan.data['examples']} examples, longest {plan.data['longest']} tokens, p95 {plan.data['p95']}, "
            f"mean {plan.data['mean']}" if plan.data else f"not measured: every batch assumed "
            f"max_seq_length ({cfg.data.max_seq_length}) long")
    if r.packed:
        shape = (f"micro-batches of {r.examples} examples packed in rows: the longest examples' call "
                 f"is {r.batch} x {r.seq} tokens")
    elif r.token_budget:
        shape = f"up to {r.tokens} tokens a micro-batch (--batch-tokens; {r.batch} x {r.seq} at the longest)"
    else:
        shape = f"batch {r.batch} x {r.seq} tokens"
    lines = [
        f"model      {cfg.model.path}: {a.layers} blocks, hidden {a.hidden}, MLP {a.inter}, "
        f"{a.heads}/{a.kv_heads} heads, vocab {a.vocab}",
        f"data       {data}",
        f"run        {shape}, LoRA rank {r.rank} on {len(r.keys)} modules x "
        f"{_adapted_layers(a, r)} blocks, {r.dtype}, {r.compute} matmul, {r.device}, "
        f"{attention_kind(a, r)} attention",
        "",
        f"{'':36}{'GB':>8}"]
    lines += [f"{name:<36}{v / GB:>8.3f}" for name, v in rows]
    lines += [f"{'predicted peak':<36}{(b.peak + b.overhead) / GB:>8.3f}",
              # what mx.get_peak_memory() (train's peak_mem_gb, doctor --bench) is to be compared with
              f"{'  of which MLX (train: peak_mem_gb)':<36}{b.peak / GB:>8.3f}"]
    if b.elastic:
        lines += [f"{'needed (MLX runs ahead less if short)':<36}{b.required / GB:>8.3f}"]
    lines += [f"{'available':<36}{plan.available / GB:>8.3f}  ({plan.memory_source})", ""]
    if not plan.available:
        lines.append("verdict    unknown: no memory figure for this device (pass --memory-gb)")
    elif plan.fits:
        lines.append(f"verdict    fits ({b.required / plan.available:.0%} of available)")
    else:
        lines.append(f"verdict    does NOT fit; try: {plan.recommendation['text']}")
    if r.token_budget:
        ck = plan.largest_batch_tokens_checkpointed
        lines.append(f"largest    --batch-tokens {plan.largest_batch_tokens}"
                     f"{'' if r.checkpoint else f' ({ck} with --grad-checkpoint true)'}"
                     f"; examples up to {plan.longest_seq} tokens wide at --batch-tokens {r.token_budget}")
    elif r.packed:
        ck = plan.largest_batch_checkpointed
        lines.append(f"largest    --batch-size {plan.largest_batch} (packed)"
                     f"{'' if r.checkpoint else f' ({ck} with --grad-checkpoint true)'}"
                     f"; examples up to {plan.longest_seq} tokens at batch {r.examples}")
    else:
        ck = plan.largest_batch_checkpointed
        lines.append(f"largest    batch {plan.largest_batch} at {r.seq} tokens"
                     f"{'' if r.checkpoint else f' ({ck} with --grad-checkpoint true)'}"
                     f"; {plan.longest_seq} tokens at batch {r.batch}")
    return "\n".join(lines)
