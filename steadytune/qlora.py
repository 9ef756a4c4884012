"""Quantized layers for QLoRA training: base weights stay in 4 (or 8) bits, compute picks the fast path.

Two ways to multiply by a quantized weight:
  native   mx.quantized_matmul on the packed weight (mlx-lm's path). Fast on Apple GPUs; on CUDA it
           runs at ~1/4.5 of a bf16 matmul at training sizes, and on Linux CPUs it is ~8x slower
           than dequantize-then-BLAS (bench/RESULTS.md).
  dequant  dequantize the layer's weight to the compute dtype right before an ordinary matmul. In
           the backward pass the weight is dequantized *again* instead of being kept, so no
           full-precision weight outlives its use and peak memory stays that of the native path.

`apply_compute(model, mode)` switches every QuantizedLinear (the ones inside mlx-lm's LoRALinear and
the output layer) and the tied QuantizedEmbedding's `as_linear` to the chosen path, by giving each
instance a subclass: parameter names, adapter files and `isinstance` checks are unchanged.

Why the recomputed dequantization needs `mx.depends`: the training step is compiled, and compile's
common-subexpression pass sees the backward `dequantize(w)` as identical to the forward one and
merges them, so every layer's dequantized weight is kept from the forward pass until its backward
(+14.5 GB for a 7B model: what the prototype's custom_function showed). Tying the backward copy to
the incoming gradient makes it a different expression, which also schedules it just before use.

Three dequantization kernels give the same bits: MLX's `mx.dequantize`; the same arithmetic as
broadcast elementwise ops, which compile fuses into one kernel (faster on the CPU and CUDA); and a
small CUDA kernel that writes 16 bytes per store (fastest on CUDA). `default_kernel` picks.

Also here, because they are the same kind of change (the same arithmetic in fewer passes over
memory): the adapter added inside the matmuls (`_lora_dequant_fn`) and the MLP's SwiGLU with a
recomputing backward pass (`swiglu`, given to mlx-lm's llama-family MLP classes).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

MODES = ("auto", "dequant", "native")


def resolve_mode(mode: str, device: str | None = None) -> str:
    """auto -> what measured fastest on `device` (default: this backend): dequant on CUDA and CPU;
    native on Metal, where quantized_matmul is MLX's best-tuned kernel and dequantizing would only
    add traffic. The memory planner asks this function too."""
    if mode != "auto":
        return mode
    from .backend import device_kind

    return "native" if (device or device_kind()) == "metal" else "dequant"


# --- the dequantize-then-matmul function with its memory-saving backward --------------------


def dequantize_elementwise(w, scales, biases, group_size: int, bits: int):
    """mx.dequantize for affine 2/4/8-bit weights written as broadcast elementwise ops.

    Inside a compiled step these fuse into one kernel that reads the packed weight once and
    writes the full-precision one once; MLX's own dequantize kernel reaches well under the
    memory bandwidth on CUDA. Arithmetic in the scales' dtype, as mx.dequantize does."""
    per_word = 32 // bits
    n, words = w.shape
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    q = (w.reshape(n, words * per_word // group_size, group_size // per_word, 1) >> shifts) & (
        (1 << bits) - 1)
    w = q.astype(scales.dtype) * scales[..., None, None] + biases[..., None, None]
    return w.reshape(n, words * per_word)


_CUDA_DEQUANT = r"""
    // Each packed word holds PER values of one quantization group, stored with one 16-byte write
    // when they fill it (bf16/fp16 at 4 bits). A thread does WPT words strided by the block size
    // (every load and store of a warp is one contiguous span), all loaded before the first store:
    // the compiler may not move loads past stores (out may alias the inputs as far as it knows).
    constexpr int PER = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1u;
    size_t first = size_t(blockIdx.x) * blockDim.x * WPT + threadIdx.x;
    uint32_t q[WPT];
    float sc[WPT], bi[WPT];
    #pragma unroll
    for (int j = 0; j < WPT; ++j) {
      size_t i = first + j * blockDim.x;
      q[j] = i < NWORDS ? w[i] : 0u;
      size_t g = i < NWORDS ? (i * PER) / GS : 0;
      sc[j] = static_cast<float>(scales[g]);
      bi[j] = static_cast<float>(biases[g]);
    }
    #pragma unroll
    for (int j = 0; j < WPT; ++j) {
      size_t i = first + j * blockDim.x;
      if (i >= NWORDS) break;
      alignas(16) T vals[PER];
      #pragma unroll
      for (int k = 0; k < PER; ++k) {
        vals[k] = static_cast<T>(static_cast<float>((q[j] >> (BITS * k)) & MASK) * sc[j] + bi[j]);
      }
      if constexpr (sizeof(T) * PER == 16) {
        *reinterpret_cast<uint4*>(out + i * PER) = *reinterpret_cast<const uint4*>(vals);
      } else {
        #pragma unroll
        for (int k = 0; k < PER; ++k) out[i * PER + k] = vals[k];
      }
    }
"""
# words per thread of the CUDA kernel: 1 to 8 measure alike alone, 1 and 4 alike inside a step
# (bench/RESULTS.md); kernel names "cuda:N" pick another for measurements
CUDA_WORDS_PER_THREAD = 4


@lru_cache(maxsize=None)
def _cuda_dequant_kernel():
    return mx.fast.cuda_kernel(name="steadytune_dequantize", input_names=["w", "scales", "biases"],
                               output_names=["out"], source=_CUDA_DEQUANT)


def dequantize_cuda(w, scales, biases, group_size: int, bits: int, words_per_thread: int | None = None):
    """mx.dequantize for affine 2/4/8-bit weights as a custom CUDA kernel (CUDA only)."""
    n, words = w.shape
    wpt = words_per_thread or CUDA_WORDS_PER_THREAD
    threads = -(-(n * words) // (256 * wpt)) * 256  # whole blocks, each spanning 256 * wpt words
    return _cuda_dequant_kernel()(
        inputs=[w, scales, biases],
        template=[("T", scales.dtype), ("BITS", bits), ("GS", group_size), ("NWORDS", n * words),
                  ("WPT", wpt)],
        grid=(threads, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(n, words * 32 // bits)], output_dtypes=[scales.dtype])[0]


def _dequantizer(group_size: int, bits: int, mode: str, kernel: str):
    if kernel.startswith("cuda") and mode == "affine" and bits in (2, 4, 8):
        wpt = int(kernel.split(":")[1]) if ":" in kernel else None  # "cuda:8": 8 words per thread
        return lambda w, scales, biases: dequantize_cuda(w, scales, biases, group_size, bits, wpt)
    if kernel == "elementwise" and mode == "affine" and bits in (2, 4, 8):
        return lambda w, scales, biases: dequantize_elementwise(w, scales, biases, group_size, bits)
    return lambda w, scales, biases: mx.dequantize(w, scales, biases, group_size=group_size,
                                                   bits=bits, mode=mode)


@lru_cache(maxsize=None)
def _dequant_matmul_fn(group_size: int, bits: int, mode: str, has_biases: bool, kernel: str):
    """x @ dequantize(w).T as an mx.custom_function whose vjp re-dequantizes w.

    Gradients flow to x only: the quantized weight is frozen (QLoRA trains the adapters)."""
    deq = _dequantizer(group_size, bits, mode, kernel)

    @mx.custom_function
    def f(x, w, scales, *biases):
        # depends on x: dequantized just in time, not whenever the scheduler reaches it
        return x @ deq(mx.depends(w, x), scales, biases[0] if biases else None).T

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w, scales, *biases = primals
        # Depends on the cotangent: not merged with the forward copy by compile, and computed
        # only when the gradient arrives (see the module docstring).
        w_again = deq(mx.depends(w, cotangent), scales, biases[0] if biases else None)
        dx = cotangent @ w_again
        return (dx, *(mx.zeros_like(p) for p in primals[1:]))

    return f


def dequant_matmul(x, w, scales, biases, group_size: int, bits: int, mode: str = "affine",
                   kernel: str = "mlx"):
    """x @ W.T for a quantized W, computed as a matmul in x's dtype (W dequantized to it).
    kernel: "mlx" (mx.dequantize) or "elementwise" (dequantize_elementwise, where it applies)."""
    f = _dequant_matmul_fn(group_size, bits, mode, biases is not None, kernel)
    if biases is None:
        return f(x, w, scales)
    return f(x, w, scales, biases)


class DequantLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear computing dequantize-then-matmul (same parameters, same names)."""

    dequant_kernel = "mlx"  # apply_compute sets it per instance (a plain attribute, not saved)

    def __call__(self, x):
        y = dequant_matmul(x, self["weight"], self["scales"], self.get("biases"),
                           self.group_size, self.bits, self.mode, self.dequant_kernel)
        if "bias" in self:
            y = y + self["bias"]
        return y


class DequantEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose `as_linear` (a tied output layer) uses dequantize-then-matmul.
    The lookup itself already dequantizes only the rows it gathers."""

    dequant_kernel = "mlx"

    def as_linear(self, x):
        return dequant_matmul(x, self["weight"], self["scales"], self.get("biases"),
                              self.group_size, self.bits, self.mode, self.dequant_kernel)


class RowsQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear on x flattened to one matrix of rows. A decoding batch arrives as
    (rows, 1, in), which MLX's CUDA quantized_matmul runs as `rows` products of one row each, every
    one reading the whole packed weight; as a (rows, in) matrix it is one product (the CUTLASS
    kernel's tiles filled with rows). H100, 7B shape, 32 rows: 110 ms a decoding step before,
    the GRPO step 15.1 s before and 7.7 s after (bench/RESULTS.md, GRPO)."""

    def __call__(self, x):
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class RowsQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output layer multiplies a matrix of rows (see above)."""

    def as_linear(self, x):
        return super().as_linear(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def rows_layout(model: nn.Module) -> int:
    """Give `model`'s quantized layers (mlx-lm's classes, as inference loads them) the row-matrix
    layout above, in place (same parameters and names); returns how many. For CUDA, where a batch
    of sequences decodes together (serve); a single sequence is one row either way."""
    swap = {nn.QuantizedLinear: RowsQuantizedLinear, nn.QuantizedEmbedding: RowsQuantizedEmbedding}
    n = 0
    for _, m in model.named_modules():
        if (cls := swap.get(type(m))) is not None:
            m.__class__ = cls
            n += 1
    return n


def dense_weight(layer: nn.Module, after: mx.array) -> mx.array | None:
    """`layer`'s weight (outputs x inputs) as one full-precision matrix that several matmuls share:
    the chunked loss's output layer, whose every chunk would otherwise dequantize the whole
    weight in its forward and again in its backward (a 262k x 640 head: 0.67 GB of float32 per
    copy, several alive at once). A DequantLinear's or DequantEmbedding's weight dequantized once
    `after` is computed (mx.depends: not earlier, so it is not kept through the forward pass); a
    float Linear's or Embedding's own weight. None where nothing full-precision is made to share
    (the native path's quantized_matmul reads the packed words) or the layer adds a bias: the
    caller calls the layer."""
    if "bias" in layer:
        return None
    if isinstance(layer, (DequantLinear, DequantEmbedding)):
        deq = _dequantizer(layer.group_size, layer.bits, layer.mode, layer.dequant_kernel)
        return deq(mx.depends(layer["weight"], after), layer["scales"], layer.get("biases"))
    if type(layer) in (nn.Linear, nn.Embedding):
        return layer.weight
    return None


@lru_cache(maxsize=None)
def _lora_dequant_fn(group_size: int, bits: int, mode: str, has_biases: bool, kernel: str, scale: float):
    """x @ dequantize(w).T + scale * xa @ b as one mx.custom_function (half precision), where
    xa = x @ a is computed by the caller (kept for the backward pass: r columns, a few hundred KB,
    where recomputing it would read x once more).

    The adapter's product is added inside the matmuls (addmm: cuBLAS reads the other term as its
    C operand) instead of by separate elementwise passes: forward, the base output is C of the
    adapter's rank-r matmul; backward, the adapter's input gradient is C of the base's. Each
    saves writing and re-reading an output-sized array per adapted layer and pass (H100, 7B
    shape: bench/RESULTS.md). The weight is dequantized again in the backward pass, as in
    _dequant_matmul_fn."""
    deq = _dequantizer(group_size, bits, mode, kernel)

    @mx.custom_function
    def f(x, xa, a, b, w, scales, *biases):
        weight = deq(mx.depends(w, x), scales, biases[0] if biases else None)
        return mx.addmm(x @ weight.T, xa, b, alpha=scale)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, xa, a, b, w, scales, *biases = primals
        weight = deq(mx.depends(w, cotangent), scales, biases[0] if biases else None)
        d = cotangent.reshape(-1, cotangent.shape[-1])
        dxa = (d @ b.T) * scale                       # gradient of x @ a
        dx = mx.addmm(cotangent @ weight, dxa.reshape(*x.shape[:-1], -1), a.T)
        da = x.reshape(-1, x.shape[-1]).T @ dxa
        db = (xa.reshape(-1, xa.shape[-1]) * scale).T @ d
        return (dx, mx.zeros_like(xa), da, db, *(mx.zeros_like(p) for p in primals[4:]))

    return f


class MixedLoRALinear(LoRALinear):
    """mlx-lm's LoRALinear with the adapter matmuls in the input's dtype.

    The adapters stay float32 (the optimizer updates float32 weights), but mlx-lm's
    `x @ lora_a` with a bfloat16 x promotes x to float32: every adapted layer then makes a float32
    copy of its input and keeps it for the backward pass (for the gradient of lora_a), twice the
    bytes of the bfloat16 input, and runs the adapter matmuls in float32. Casting the adapters to
    x's dtype instead keeps the saved input in bfloat16; the gradients still arrive in float32
    through the cast. In float32 compute (the CPU default) this is exactly mlx-lm's layer. In half
    precision over a DequantLinear without dropout, the adapter is added inside the matmuls
    (_lora_dequant_fn): the same sum, fewer passes over output-sized arrays, unless `fused` is
    False (apply_compute's fused_lora: an A/B measurement of the separate passes)."""

    fused = True

    def __call__(self, x):
        lin = self.linear
        if (self.fused and x.dtype in (mx.bfloat16, mx.float16) and type(lin) is DequantLinear
                and getattr(self.dropout, "_p_1", 0.0) == 1.0):  # no dropout: the same x throughout
            f = _lora_dequant_fn(lin.group_size, lin.bits, lin.mode, lin.get("biases") is not None,
                                 lin.dequant_kernel, float(self.scale))
            q = [lin["weight"], lin["scales"]] + ([lin["biases"]] if lin.get("biases") is not None else [])
            a = self.lora_a.astype(x.dtype)
            # f's backward computes every gradient: none may also flow through xa
            y = f(x, mx.stop_gradient(x @ a), a, self.lora_b.astype(x.dtype), *q)
            return y + lin["bias"] if "bias" in lin else y
        y = lin(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(x.dtype)


# MLX's CUDA gather_qmm fails ("cuGraphAddKernelNode(...) failed: invalid argument") on a call that
# routes more than 65,535 rows, a kernel grid's limit: one H100, mlx 0.32.4, 81,920 rows (4 rows of
# 2,048 tokens at Qwen3-Next's 10 experts a token) failed forward and backward, 40,960 ran, and the
# same 81,920 in slices of 40,960 ran (bench/RESULTS.md). mlx_lm.lora fails there too.
GATHER_ROWS = 40960


class SlicedQuantizedSwitchLinear(QuantizedSwitchLinear):
    """mlx-lm's QuantizedSwitchLinear whose expert-sorted calls (one routed row a token and expert,
    SwitchGLU's path from 64 routed rows up) run in slices of at most GATHER_ROWS rows: the same
    products row by row, so the same bits, concatenated. Smaller calls are mlx-lm's own call."""

    def __call__(self, x, indices, sorted_indices=False):
        n = indices.shape[0]
        if not sorted_indices or indices.ndim != 1 or x.shape[0] != n or n <= GATHER_ROWS:
            return super().__call__(x, indices, sorted_indices)
        call = super().__call__
        return mx.concatenate([call(x[i:i + GATHER_ROWS], indices[i:i + GATHER_ROWS], True)
                               for i in range(0, n, GATHER_ROWS)])


def slice_expert_calls(model: nn.Module) -> None:
    """Every QuantizedSwitchLinear of the model (experts' base weights, inside an adapter or not)
    becomes a SlicedQuantizedSwitchLinear: the same parameters and names. load_base does it for
    every path that loads a model (training, generation, serving), apply_compute for models built
    otherwise (benches, tests)."""
    for _, m in model.named_modules():
        if type(m) is QuantizedSwitchLinear:
            m.__class__ = SlicedQuantizedSwitchLinear


class MixedLoRASwitchLinear(LoRASwitchLinear):
    """mlx-lm's LoRASwitchLinear (one adapter per expert of a MoE layer) with the adapter matmuls
    in the input's dtype, for the reason MixedLoRALinear gives. The base experts stay as mlx-lm
    holds them (quantized: gather_qmm on the packed weights) and each token meets only the
    adapters of the experts it is routed to: `gather_mm` with the router's indices, as in
    mlx-lm, so the adapters' work grows with the experts per token, not the experts. MLX's CPU
    gather_mm multiplies float32 only: there the adapters stay float32, as in mlx-lm."""

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        dtype = mx.float32 if mx.default_device() == mx.cpu else x.dtype
        a = self.lora_a.astype(dtype).swapaxes(-1, -2)
        b = self.lora_b.astype(dtype).swapaxes(-1, -2)
        z = mx.gather_mm(self.dropout(x), a, rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, b, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(x.dtype)


def checkpoint_blocks(model: nn.Module) -> list[int]:
    """Gradient checkpointing per transformer block: the block's activations are recomputed in
    the backward pass. Done by giving each block instance a subclass whose __call__ is
    checkpointed, so parameter names (and adapter files) are unchanged and no other model in the
    process is affected (mlx-lm's helper patches the class itself). Layers joined by shared keys
    (kv_linked_layers) are left as they are: a checkpoint's backward pass sees only its block's
    input and parameters, not keys that enter or leave it through the cache or as a call
    argument (gemma4_text's shared_kv). Returns those layers' indexes (the caller says so: the
    run keeps their activations)."""
    linked = kv_linked_layers(model)
    for i, layer in enumerate(model.layers):
        if i in linked:
            continue
        cls = type(layer)
        if getattr(cls, "_steadytune_ckpt", False):
            continue
        base_call = cls.__call__

        def call(self, x, *args, _base=base_call, **kwargs):
            # Only the parameters and the hidden state are the checkpoint's inputs; the mask (a
            # packed run's block-diagonal bias array) and the cache are closed over as constants:
            # as inputs, their gradients would be asked for, and MLX's fused attention has no
            # gradient with respect to a mask.
            def inner(params, h):
                self.update(params)
                return _base(self, h, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        layer.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_steadytune_ckpt": True})
    return sorted(linked)


# Where an mlx-lm model lists, for each layer, the layer whose keys and values it attends to (its
# own index where it computes them): gemma3n's KV-shared layers read them through the cache
# (`layer_idx_to_cache_idx`), gemma4_text's get them as a call argument (`previous_kvs`: the model
# hands each block the `shared_kv` its owner returned). Either way they cross from block to block
# outside the hidden state, which is all a checkpoint's backward pass sees.
KV_SOURCE_LISTS = ("layer_idx_to_cache_idx", "previous_kvs")


def kv_linked_layers(model: nn.Module) -> set[int]:
    """Indexes of the layers that attend to another layer's keys and values (gemma3n's and
    gemma4_text's KV-shared layers) and of the layers whose keys they read: from the list mlx-lm's
    model keeps (KV_SOURCE_LISTS); the planner, which has only the config, computes that list with
    gemma3n_cache_layers. What else gemma4_text hands a block (per_layer_input, from the
    embeddings and a model-level projection; the offset and the mask) depends on nothing trainable
    (adapters live in the blocks only), so the blocks it reaches may be checkpointed."""
    shared = {i for i, layer in enumerate(model.layers) if _reads_other_keys(getattr(layer, "self_attn", None))}
    if not shared:
        return set()
    lists = (getattr(m, name, None) for _, m in model.named_modules() for name in KV_SOURCE_LISTS)
    owner = next((l for l in lists if isinstance(l, list) and len(l) == len(model.layers)), None)
    if owner is None:  # a layout not known: the last layer before the shared ones and all after it
        return set(range(min(shared) - 1, len(model.layers)))
    return shared | cache_linked(owner)


def _reads_other_keys(attn) -> bool:
    """Whether an attention layer attends to another layer's keys: gemma3n's
    `is_kv_shared_layer`, gemma4_text's `has_kv` False (it has no k_proj)."""
    return bool(getattr(attn, "is_kv_shared_layer", False)) or getattr(attn, "has_kv", True) is False


def cache_linked(cache_of: list[int]) -> set[int]:
    """The layers that read another layer's cache (cache_of[i] != i) and the layers they read: the
    trainer's rule, from mlx-lm's list (kv_linked_layers), and the planner's, from the config's
    (plan.arch_from_config)."""
    readers = {i for i, c in enumerate(cache_of) if c != i}
    return readers | {cache_of[i] for i in readers}


def gemma3n_cache_layers(layer_types: list[str], kv_shared: int) -> list[int]:
    """The cache each layer of a gemma3n model reads, from its config (mlx-lm's gemma3n
    `layer_idx_to_cache_idx`, and gemma4_text's `previous_kvs`, the same rule): its own, except in
    the last `kv_shared` layers, which read the cache of the last layer of their kind (full or
    sliding attention) before them."""
    first = len(layer_types) - kv_shared
    last = {kind: i for i, kind in enumerate(layer_types[:first])}
    return [i if i < first else last[kind] for i, kind in enumerate(layer_types)]


# --- SwiGLU with a backward pass that recomputes instead of keeping -------------------------


@mx.custom_function
def swiglu(gate, x):
    """silu(gate) * x (mlx-lm's swiglu, same forward) with a backward pass that recomputes
    sigmoid(gate): autodiff of silu(gate) * x keeps sigmoid(gate) and silu(gate) for the backward
    pass, so compile cannot fuse the three elementwise ops of the forward (each intermediate leaves
    the fused region), and the backward runs as separate passes too. Here the forward is one fused
    pass (read gate and x, write the product) and the backward another (read the gradient, gate
    and x; write both gradients), computed in float32 inside the kernel. For a 7B model at 4 x 1024
    tokens that is 2 intermediate-sized arrays less per layer to keep, and ~300 us per layer less
    memory traffic on an H100 (bench/RESULTS.md). The forward is mlx-lm's own function."""
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    return mlx_lm_swiglu(gate, x)


_CUDA_SWIGLU_VJP = r"""
    // d/dgate and d/dx of silu(gate) * x, from the incoming gradient d: one pass that reads d,
    // gate and x and writes both gradients, in float32 arithmetic, VEC elements per thread
    // (16-byte loads and stores where the pointers allow).
    constexpr int VEC = 16 / sizeof(T);
    size_t i = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
    if (i >= N) return;
    auto one = [&](size_t k) {
      float dv = static_cast<float>(d[k]), gv = static_cast<float>(gate[k]);
      float uv = static_cast<float>(x[k]);
      float sv = 1.0f / (1.0f + __expf(-gv));
      d_gate[k] = static_cast<T>(dv * uv * sv * (1.0f + gv * (1.0f - sv)));
      d_x[k] = static_cast<T>(dv * gv * sv);
    };
    unsigned long long addr = reinterpret_cast<unsigned long long>(d + i) |
        reinterpret_cast<unsigned long long>(gate + i) | reinterpret_cast<unsigned long long>(x + i) |
        reinterpret_cast<unsigned long long>(d_gate + i) | reinterpret_cast<unsigned long long>(d_x + i);
    if (i + VEC <= N && (addr & 15ull) == 0) {
      alignas(16) T dv[VEC], gv[VEC], uv[VEC], og[VEC], ox[VEC];
      *reinterpret_cast<uint4*>(dv) = *reinterpret_cast<const uint4*>(d + i);
      *reinterpret_cast<uint4*>(gv) = *reinterpret_cast<const uint4*>(gate + i);
      *reinterpret_cast<uint4*>(uv) = *reinterpret_cast<const uint4*>(x + i);
      #pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float a = static_cast<float>(dv[k]), g = static_cast<float>(gv[k]), u = static_cast<float>(uv[k]);
        float s = 1.0f / (1.0f + __expf(-g));
        og[k] = static_cast<T>(a * u * s * (1.0f + g * (1.0f - s)));
        ox[k] = static_cast<T>(a * g * s);
      }
      *reinterpret_cast<uint4*>(d_gate + i) = *reinterpret_cast<const uint4*>(og);
      *reinterpret_cast<uint4*>(d_x + i) = *reinterpret_cast<const uint4*>(ox);
    } else {
      for (size_t k = i; k < i + VEC && k < N; ++k) one(k);
    }
"""


@lru_cache(maxsize=None)
def _cuda_swiglu_vjp_kernel():
    return mx.fast.cuda_kernel(name="steadytune_swiglu_vjp", input_names=["d", "gate", "x"],
                               output_names=["d_gate", "d_x"], source=_CUDA_SWIGLU_VJP)


def swiglu_vjp_cuda(d, gate, x):
    """(d/dgate, d/dx) of silu(gate) * x as one CUDA kernel (half precision inputs)."""
    n = gate.size
    vec = 16 // gate.dtype.size
    threads = -(-n // vec)
    return _cuda_swiglu_vjp_kernel()(
        inputs=[d, gate, x], template=[("T", gate.dtype), ("N", n)],
        grid=(threads, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[gate.shape, x.shape], output_dtypes=[gate.dtype, x.dtype])


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    if gate.dtype in (mx.bfloat16, mx.float16) and gate.dtype == x.dtype == cotangent.dtype \
            and gate.shape == x.shape == cotangent.shape and _on_cuda():
        # compile would keep sigmoid(gate) as an array between two kernels (it feeds both
        # gradients): one kernel instead
        return tuple(swiglu_vjp_cuda(cotangent, gate, x))
    g, u, d = gate.astype(mx.float32), x.astype(mx.float32), cotangent.astype(mx.float32)
    s = mx.sigmoid(g)
    d_gate = d * u * s * (1.0 + g * (1.0 - s))  # d/dg of g * sigmoid(g), times x
    return d_gate.astype(gate.dtype), (d * g * s).astype(x.dtype)


def _on_cuda() -> bool:
    from .backend import device_kind

    return device_kind() == "cuda"


_SWIGLU_CALL = "return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))"


@lru_cache(maxsize=None)
def _recomputing_mlp_class(cls):
    """A subclass of an mlx-lm MLP class computing `down(swiglu(gate(x), up(x)))` that uses the
    swiglu above, or None when the class's __call__ is anything else (checked on its source, so an
    mlx-lm release that changes the MLP is left alone rather than mis-patched)."""
    import inspect

    try:
        lines = [x.strip() for x in inspect.getsource(cls.__call__).splitlines()]
    except (OSError, TypeError):
        return None
    if not cls.__module__.startswith("mlx_lm.models.") or _SWIGLU_CALL not in lines or \
            len([x for x in lines if x and not x.startswith(("def ", "#", '"""'))]) != 1:
        return None

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


# class -> (native class, dequant class); exact types only, so other subclasses are left alone
_CLASSES = {c: pair for pair in [(nn.QuantizedLinear, DequantLinear),
                                 (nn.QuantizedEmbedding, DequantEmbedding)] for c in pair}


def default_kernel() -> str:
    """The dequantization kernel measured fastest on this backend (bench/RESULTS.md): the CUDA
    kernel on CUDA (bit-exact, 3% faster steps than the fused elementwise ops), the fused
    elementwise ops elsewhere (1.4x faster steps than mx.dequantize on the CPU)."""
    return "cuda" if _on_cuda() else "elementwise"


def apply_compute(model: nn.Module, mode: str = "auto", kernel: str | None = None,
                  fused_lora: bool = True, fused_swiglu: bool = True) -> dict:
    """Switch the model's quantized layers to `mode` (auto, dequant, native). Call after the LoRA
    layers are in place (it reaches the QuantizedLinear inside each LoRALinear). fused_lora /
    fused_swiglu False keep the adapter's separate passes / mlx-lm's MLP (A/B measurements). Returns
    {"mode": resolved mode, "kernel": dequantization kernel, "layers": layers switched}."""
    if mode not in MODES:
        raise ValueError(f"compute mode must be one of {MODES}, got {mode!r}")
    resolved = resolve_mode(mode)
    kernel = kernel or default_kernel()
    dequant = resolved == "dequant"
    n = 0
    slice_expert_calls(model)
    for _, m in model.named_modules():
        if type(m) is LoRALinear:  # same parameters and names: adapter files are unchanged
            m.__class__ = MixedLoRALinear
            m.fused = fused_lora
        if type(m) is LoRASwitchLinear:
            m.__class__ = MixedLoRASwitchLinear
        if fused_swiglu and type(m).__name__ == "MLP" and (mlp := _recomputing_mlp_class(type(m))):
            m.__class__ = mlp
        pair = _CLASSES.get(type(m))
        if pair is None:
            continue
        m.__class__ = pair[dequant]
        if dequant:
            m.dequant_kernel = kernel
        n += 1
    return {"mode": resolved, "kernel": kernel if resolved == "dequant" else None, "layers": n}
