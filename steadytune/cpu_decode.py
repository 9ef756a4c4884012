"""Answering on the CPU with a compiled forward pass over the 4-bit weights (cpu_decode.c).

Decoding reads every weight once per token. On the CPU, MLX's quantized matmul runs at about
1 GMAC/s and its float path reads 4 bytes a weight through OpenBLAS's GEMM, so the default model
answered at 4.5 tokens/s quantized and 6.3 from a float32 copy on 2 cores (bench/RESULTS.md).
`CpuDecoder` reads each 4-bit weight once, as MLX stores it, with SIMD code built from
cpu_decode.c by the machine's C compiler the first time it is needed (about a second; cached).

A `CpuDecoder` stands in for the mlx-lm model in mlx-lm's generate_step / stream_generate and
server: it is called with token ids and a cache from its own `make_cache()`, returns the logits
of the last position, and passes every other attribute through to the wrapped model. It serves
llama-family models (llama, mistral, qwen2) with 4- or 8-bit affine or float32 layers and LoRA
adapters applied as low-rank products (not fused, so no re-quantizing); anything else answers
through MLX (generation.inference_copy), with the reason in the line that says which path runs.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

import mlx.core as mx

SOURCE = Path(__file__).with_name("cpu_decode.c")
MODEL_TYPES = ("llama", "mistral", "qwen2")
_F = ctypes.POINTER(ctypes.c_float)


class _Linear(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int32), ("in_", ctypes.c_int32), ("out", ctypes.c_int32),
                ("group", ctypes.c_int32), ("w", _F), ("wq", ctypes.POINTER(ctypes.c_uint32)),
                ("scales", _F), ("biases", _F), ("bias", _F), ("rank", ctypes.c_int32),
                ("lscale", ctypes.c_float), ("la", _F), ("lb", _F)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("dim", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("hidden", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("traditional", ctypes.c_int32), ("eps", ctypes.c_float),
                ("attn_scale", ctypes.c_float), ("norms", _F), ("lin", ctypes.POINTER(_Linear)),
                ("embed", _Linear), ("head", _Linear)]


class Unsupported(Exception):
    """This model or machine answers through MLX instead; the message says why."""


# ---------------------------------------------------------------------------------------------
# Building the library


def _cache_dir() -> Path:
    """A folder for the built library that only this user can write (created 0700): a library
    another user could replace would run their code in this process. Refused (Unsupported) if it
    is not ours or others can write it."""
    from .runinfo import cache_dir

    folder = cache_dir()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.stat()
    except OSError:  # no home to write in: a folder of our own in the system's temporary directory
        folder = Path(tempfile.gettempdir()) / f"steadytune-{os.getuid()}"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(folder)
        except OSError as e:
            raise Unsupported(f"no folder to build steadytune's CPU decoder in ({folder}: {e.strerror})") from None
    if not os.path.isdir(folder) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise Unsupported(f"{folder} is writable by other users or not yours, so steadytune's CPU decoder is "
                          f"not built or loaded there; run: chmod 700 {folder}")
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(path: Path) -> bool:
    """Whether the cached library is the one built here: ours, not writable by others, and its
    bytes hash to what was recorded when it was built (a truncated, emptied or altered file, or
    a record that is missing, means: build it again)."""
    try:
        st = os.lstat(path)
        want = path.with_name(path.name + ".sha256").read_text().strip()
        return (st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.path.isfile(path)
                and not os.path.islink(path) and _sha256(path) == want)
    except OSError:
        return False


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _compiler() -> list[str]:
    """The compiler command: $CC split as a shell would (CC="gcc -O2"), else cc, gcc or clang."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        try:
            cmd = shlex.split(cc)
        except ValueError as e:
            raise Unsupported(f"CC={cc!r} cannot be read as a command ({e}); set CC to a C compiler, "
                              "e.g. CC=gcc") from None
        if cmd:
            return cmd
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not found:
        raise Unsupported("no C compiler to build steadytune's CPU decoder (install gcc)")
    return [found]


def _build(cc: list[str], flags: list[str], path: Path) -> None:
    """Compile into a temporary name, check the compiler made a library, fsync it, record its hash,
    then rename it into place (atomic: another process may be building the same file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    errors = "?"
    for extra in (["-fopenmp"], []):  # without OpenMP (Apple's clang), one thread
        try:
            r = subprocess.run([*cc, *flags, *extra, str(SOURCE), "-o", str(tmp), "-lm"],
                               capture_output=True, text=True)
        except OSError as e:
            errors = f"{cc[0]}: {e.strerror}"
            break
        if r.returncode != 0:
            errors = (r.stderr.strip().splitlines() or ["?"])[-1]
            continue
        if not tmp.is_file() or tmp.stat().st_size == 0:
            errors = f"CC={' '.join(cc)} exited 0 but wrote no library; set CC to a C compiler such as gcc or clang"
            break
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o700)
        _write_synced(path.with_name(path.name + ".sha256"), _sha256(tmp).encode())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    tmp.unlink(missing_ok=True)
    raise Unsupported(f"the C compiler could not build steadytune's CPU decoder ({errors})")


def _cpu_signature() -> str:
    """What -march=native depends on: a library built on one CPU may not run on another that
    shares the home folder."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


_LIB: ctypes.CDLL | None = None
_LIB_ERROR: str | None = None


def library() -> ctypes.CDLL:
    """cpu_decode.c built for this machine (cached per source, compiler and CPU, verified by its
    hash before every load); raises Unsupported when no C compiler works."""
    global _LIB, _LIB_ERROR
    if _LIB is not None:
        return _LIB
    if _LIB_ERROR is not None:
        raise Unsupported(_LIB_ERROR)
    try:
        _LIB = _load()
    except Unsupported as e:
        _LIB_ERROR = str(e)
        raise
    return _LIB


def _load() -> ctypes.CDLL:
    cc = _compiler()
    arch = "-march=native" if platform.machine().lower() in ("x86_64", "amd64", "i686") else "-mcpu=native"
    flags = ["-O3", arch, "-ffp-contract=fast", "-fPIC", "-shared", "-std=gnu11"]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_decode-{key}.so"
    if not _verified(path):
        _build(cc, flags, path)
    # OpenMP's threads spin at each barrier by default, and the decoder passes about 250 barriers
    # a token: where other processes share the cores, a spinning thread takes the core of the
    # thread it waits for. Measured on 2 shared cores (load 5): 260 ms a token spinning, 19 ms
    # waiting passively. Read by the OpenMP runtime when it loads, with the library below; a value
    # the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        lib = ctypes.CDLL(str(path))
        lib.st_forward.restype = lib.st_forward_rows.restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        raise Unsupported(f"the library CC={' '.join(cc)} built cannot be loaded ({str(e)[:120]}); set CC to "
                          "a C compiler such as gcc or clang") from None
    lib.st_forward.argtypes = [ctypes.POINTER(_Model), ctypes.POINTER(ctypes.c_int32), ctypes.c_int,
                               ctypes.c_int, _F, _F, ctypes.c_int, _F, _F, _F]
    _I = ctypes.POINTER(ctypes.c_int32)
    lib.st_forward_rows.argtypes = [ctypes.POINTER(_Model), _I, ctypes.c_int, _I, _I, _F, _F, ctypes.c_int,
                                    _F, _F, _F]
    return lib


# ---------------------------------------------------------------------------------------------
# The model, as the C side sees it


def _ptr(a: np.ndarray, kind=_F):
    return a.ctypes.data_as(kind)


class CpuDecoder:
    """mlx-lm model stand-in that answers through cpu_decode.c (see the module docstring)."""

    def __init__(self, model):
        self._model = model
        self._keep: list[np.ndarray] = []  # the arrays the C structs point into
        self._lib = library()
        inner, layers = _structure(model)
        attn = layers[0].self_attn
        first = layers[0].self_attn.q_proj
        self.dim = _in_features(first)
        self.n_heads, self.n_kv_heads = int(attn.n_heads), int(attn.n_kv_heads)
        self.head_dim = _out_features(first) // self.n_heads
        self.n_layers = len(layers)
        self._rope = attn.rope
        self._traditional = bool(attn.rope.traditional)
        self._cos = self._sin = np.zeros((0, self.head_dim // 2), np.float32)
        lin = (_Linear * (7 * self.n_layers))()
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, layer.mlp
            for j, mod in enumerate((a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)):
                lin[7 * i + j] = self._linear(mod)
        norms = [np.concatenate([self._f32(l.input_layernorm.weight), self._f32(l.post_attention_layernorm.weight)])
                 for l in layers]
        norms = self._hold(np.concatenate(norms + [self._f32(inner.norm.weight)]))
        embed = self._linear(inner.embed_tokens)
        head = self._linear(model.lm_head) if hasattr(model, "lm_head") else embed
        self._lin = lin
        self._struct = _Model(
            n_layers=self.n_layers, dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim, hidden=_out_features(layers[0].mlp.gate_proj), vocab=head.out,
            traditional=int(self._traditional), eps=float(layers[0].input_layernorm.eps),
            attn_scale=float(attn.scale), norms=_ptr(norms), lin=lin, embed=embed, head=head)
        self.vocab = head.out

    # -- arrays ----------------------------------------------------------------------------------
    def _hold(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        self._keep.append(a)
        return a

    def _f32(self, a: mx.array) -> np.ndarray:
        return self._hold(np.array(a.astype(mx.float32), copy=False))

    def _linear(self, mod) -> _Linear:
        s = _Linear()
        if hasattr(mod, "lora_a"):
            s.rank, s.lscale = int(mod.lora_a.shape[1]), float(mod.scale)
            s.la, s.lb = _ptr(self._f32(mod.lora_a)), _ptr(self._f32(mod.lora_b))
            mod = mod.linear
        if "scales" in mod:
            s.bits, s.group = int(mod.bits), int(mod.group_size)
            wq = self._hold(np.array(mod["weight"], copy=False))
            s.out, s.in_ = wq.shape[0], wq.shape[1] * 32 // s.bits
            s.wq = _ptr(wq, ctypes.POINTER(ctypes.c_uint32))
            s.scales, s.biases = _ptr(self._f32(mod["scales"])), _ptr(self._f32(mod["biases"]))
        else:
            w = self._f32(mod["weight"])
            s.bits, s.out, s.in_ = 0, w.shape[0], w.shape[1]
            s.w = _ptr(w)
        if "bias" in mod:
            s.bias = _ptr(self._f32(mod["bias"]))
        return s

    def _rope_table(self, n: int) -> None:
        """Cosines and sines of positions 0..n-1, read off the model's own RoPE module by rotating
        unit vectors (so scaled and llama3 variants need no code here)."""
        if len(self._cos) >= n:
            return
        n = max(n, 2 * len(self._cos), 256)
        h = self.head_dim // 2
        probe = np.zeros((1, 1, n, self.head_dim), np.float32)
        if self._traditional:
            probe[..., 0::2] = 1
        else:
            probe[..., :h] = 1
        out = np.array(self._rope(mx.array(probe), offset=0).astype(mx.float32))[0, 0]
        cos, sin = (out[:, 0::2], out[:, 1::2]) if self._traditional else (out[:, :h], out[:, h:])
        self._cos, self._sin = np.ascontiguousarray(cos), np.ascontiguousarray(sin)

    # -- the mlx-lm model interface --------------------------------------------------------------
    def make_cache(self) -> list:
        return [DecodeCache(self)]

    def __call__(self, inputs, cache=None, **_):
        ids = np.array(inputs, dtype=np.int32).reshape(-1)
        c = cache[0] if cache else DecodeCache(self)
        return mx.array(c.forward(ids))[None, None]

    def __getattr__(self, name):  # only for names not found on the decoder itself
        if name == "_model":  # not set yet (copy.copy builds an instance without __init__)
            raise AttributeError(name)
        return getattr(self._model, name)

    def sample_rows(self, prompts: list[list[int]], group: int, max_new_tokens: int, sample, eos: set) -> list[list[int]]:
        """`group` completions of each prompt, decoded together: each prompt is read once (its
        keys and values copied to the group's other rows), then every unfinished row takes one
        token per pass over the weights (st_forward_rows). `sample` maps log-probabilities
        (rows x vocab, an mx.array) to one token id a row; a row ends after an `eos` id (kept) or
        max_new_tokens. Returns the completions in the order prompt 0's group, prompt 1's, ..."""
        n, cap = len(prompts) * group, max(len(p) for p in prompts) + max_new_tokens
        self._rope_table(cap)
        shape = (n, self.n_layers, self.n_kv_heads, cap, self.head_dim)
        keys, values = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        logits = np.empty((n, self.vocab), np.float32)
        for i, prompt in enumerate(prompts):
            ids = np.ascontiguousarray(prompt, dtype=np.int32)
            if len(ids) == 0 or ids.min() < 0 or ids.max() >= self._struct.embed.out:
                raise ValueError(f"prompt {i}: token ids outside the model's embedding table")
            r = i * group
            if self._lib.st_forward(ctypes.byref(self._struct), _ptr(ids, ctypes.POINTER(ctypes.c_int32)), len(ids),
                                    0, _ptr(keys[r]), _ptr(values[r]), cap, _ptr(self._cos), _ptr(self._sin),
                                    _ptr(logits[r])) != 0:
                raise MemoryError(f"steadytune's CPU decoder ran out of memory for {len(ids)} tokens")
            keys[r + 1:r + group, ..., :len(ids), :] = keys[r, ..., :len(ids), :]
            values[r + 1:r + group, ..., :len(ids), :] = values[r, ..., :len(ids), :]
            logits[r + 1:r + group] = logits[r]
        pos = np.asarray([len(p) for p in prompts for _ in range(group)], np.int32)
        out: list[list[int]] = [[] for _ in range(n)]
        live = np.arange(n, dtype=np.int32)
        while True:
            lg = mx.array(logits[:len(live)])
            tokens = np.array(sample(lg - mx.logsumexp(lg, axis=-1, keepdims=True))).astype(np.int32).reshape(-1)
            keep = []
            for j, (row, t) in enumerate(zip(live, tokens)):
                out[row].append(int(t))
                if int(t) not in eos and len(out[row]) < max_new_tokens:
                    keep.append(j)
            if not keep:
                return out
            live, ids = np.ascontiguousarray(live[keep]), np.ascontiguousarray(tokens[keep])
            at = np.ascontiguousarray(pos[live])
            i32 = ctypes.POINTER(ctypes.c_int32)
            if self._lib.st_forward_rows(ctypes.byref(self._struct), _ptr(ids, i32), len(live), _ptr(live, i32),
                                         _ptr(at, i32), _ptr(keys), _ptr(values), cap, _ptr(self._cos),
                                         _ptr(self._sin), _ptr(logits)) != 0:
                raise MemoryError(f"steadytune's CPU decoder ran out of memory for {len(live)} rows")
            pos[live] += 1

    def describe(self) -> str:
        q = {s.bits for s in self._lin} | {self._struct.head.bits}
        kind = "+".join(f"{b}-bit" if b else "float32" for b in sorted(q))
        lora = " with the adapters as low-rank products" if any(s.rank for s in self._lin) else ""
        return f"steadytune's compiled CPU decoder on the {kind} weights{lora}"


class DecodeCache:
    """Keys and values of one sequence (float32, n_layers x n_kv_heads x capacity x head_dim),
    trimmable like mlx-lm's KVCache, so the server's prompt cache works."""

    def __init__(self, dec: CpuDecoder):
        self.dec, self.offset = dec, 0
        self.keys = self.values = np.zeros((dec.n_layers, dec.n_kv_heads, 0, dec.head_dim), np.float32)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        d, n = self.dec, len(ids)
        need = self.offset + n
        if need > self.keys.shape[2]:
            cap = max(need, 2 * self.keys.shape[2], 256)
            for name in ("keys", "values"):
                new = np.zeros(self.keys.shape[:2] + (cap, d.head_dim), np.float32)
                new[:, :, :self.offset] = getattr(self, name)[:, :, :self.offset]
                setattr(self, name, new)
        ids = np.asarray(ids)
        rows = d._struct.embed.out
        if n and (ids.min() < 0 or ids.max() >= rows):  # the C code reads the embedding row unchecked
            raise ValueError(f"token id {int(ids.max() if ids.max() >= rows else ids.min())} is outside the "
                             f"model's embedding table (ids 0 to {rows - 1})")
        d._rope_table(need)
        logits = np.empty(d.vocab, np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        rc = d._lib.st_forward(ctypes.byref(d._struct), _ptr(ids, ctypes.POINTER(ctypes.c_int32)), n,
                               self.offset, _ptr(self.keys), _ptr(self.values), self.keys.shape[2],
                               _ptr(d._cos), _ptr(d._sin), _ptr(logits))
        if rc != 0:
            raise MemoryError(f"steadytune's CPU decoder ran out of memory for {n} tokens")
        self.offset = need
        return logits

    # the parts of mlx-lm's cache interface that generate_step and the server use
    @property
    def state(self) -> list:
        return []

    @property
    def nbytes(self) -> int:
        return 2 * self.dec.n_layers * self.dec.n_kv_heads * self.offset * self.dec.head_dim * 4

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.offset == 0

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.keys, new.values = self.keys.copy(), self.values.copy()
        return new


# ---------------------------------------------------------------------------------------------
# What the decoder covers


def _in_features(mod) -> int:
    mod = getattr(mod, "linear", mod)
    if "scales" in mod:
        return mod["weight"].shape[1] * 32 // mod.bits
    return mod["weight"].shape[1]


def _out_features(mod) -> int:
    return getattr(mod, "linear", mod)["weight"].shape[0]


def _check_linear(name: str, mod) -> None:
    if hasattr(mod, "lora_a"):
        if hasattr(mod, "m") or not hasattr(mod, "lora_b") or not hasattr(mod, "linear"):
            raise Unsupported(f"{name}: only LoRA adapters (not DoRA)")
        mod = mod.linear
    if "scales" in mod:
        bits, group = getattr(mod, "bits", 0), getattr(mod, "group_size", 0)
        if getattr(mod, "mode", "affine") != "affine" or "biases" not in mod or bits not in (4, 8):
            raise Unsupported(f"{name}: {bits}-bit {getattr(mod, 'mode', '')} weights (the decoder reads "
                              "4- and 8-bit affine)")
        vpw = 32 // bits
        words = group // vpw if group % vpw == 0 else 0
        if not (words == 4 and bits == 4 or words and words % 8 == 0) or _in_features(mod) % (8 * vpw):
            raise Unsupported(f"{name}: group size {group} at {bits} bits")
    elif "weight" not in mod or mod["weight"].ndim != 2:
        raise Unsupported(f"{name}: a {type(mod).__name__} layer")


def _structure(model):
    """The llama-family parts of an mlx-lm model, or Unsupported."""
    import mlx.nn as nn

    mtype = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", None)
    if mtype not in MODEL_TYPES:
        raise Unsupported(f"model type {mtype!r} (the decoder covers {', '.join(MODEL_TYPES)})")
    inner = getattr(model, "model", None)
    layers = list(getattr(inner, "layers", []) or [])
    if not layers or not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        raise Unsupported("an unfamiliar module layout")
    for i, layer in enumerate(layers):
        a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        need = ["q_proj", "k_proj", "v_proj", "o_proj", "rope", "n_heads", "n_kv_heads", "scale"]
        if a is None or m is None or any(not hasattr(a, k) for k in need) or \
                any(not hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj")):
            raise Unsupported(f"layer {i}: an unfamiliar attention or MLP")
        if type(a.rope) is not type(layers[0].self_attn.rope) or not hasattr(a.rope, "traditional") or \
                getattr(a.rope, "dims", None) not in (None, _out_features(a.q_proj) // a.n_heads):
            raise Unsupported(f"layer {i}: a partial or mixed RoPE")
        for n in ("input_layernorm", "post_attention_layernorm"):
            if type(getattr(layer, n, None)) is not nn.RMSNorm:
                raise Unsupported(f"layer {i}: {n} is not an RMSNorm")
        if type(m).__call__ is not type(layers[0].mlp).__call__:
            raise Unsupported(f"layer {i}: a different MLP")
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _check_linear(f"layer {i} {n}", getattr(a, n))
        for n in ("gate_proj", "up_proj", "down_proj"):
            _check_linear(f"layer {i} {n}", getattr(m, n))
    if type(inner.norm) is not nn.RMSNorm:
        raise Unsupported("the final norm is not an RMSNorm")
    emb = inner.embed_tokens
    if type(emb) not in (nn.Embedding, nn.QuantizedEmbedding) and not hasattr(emb, "as_linear"):
        raise Unsupported(f"a {type(emb).__name__} embedding")
    _check_linear("embed_tokens", emb)
    if hasattr(model, "lm_head"):
        _check_linear("lm_head", model.lm_head)
    return inner, layers
