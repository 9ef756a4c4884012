"""Fuzzing the parsers that read what users (and strangers) hand us: only UserError may escape.

- data: steadytune.data.read_file on random bytes and on random JSON shapes, and tokenization of
  whatever read_file accepts;
- config: apply_overrides + validate on random trees, load_yaml + resolve on random YAML text;
- GGUF: check_gguf_header on random mutations and truncations of a small valid GGUF, and for a
  sample, load_gguf in a subprocess with MLX's native reader watched, to show it is never reached
  with a header the check refused (and that nothing it is handed crashes the process).

Each test runs a few seconds. STEADYTUNE_FUZZ_EXAMPLES=N runs N random (not derandomized)
examples per test and prints how many ran, for a long session:
    STEADYTUNE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py -s
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_env
from steadytune.config import Config, apply_overrides, resolve
from steadytune.data import read_file, tokenize_all
from steadytune.errors import UserError

LONG = int(os.environ.get("STEADYTUNE_FUZZ_EXAMPLES", "0"))
COUNTS: Counter = Counter()


def fuzz(examples: int):
    """Hypothesis settings: `examples` derandomized inputs, or LONG random ones."""
    return settings(max_examples=LONG or examples, derandomize=not LONG, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    if LONG:
        print("\nfuzz inputs run without a crash:", dict(COUNTS))


def _only_user_errors(fn, *args, kind: str):
    """Call fn; a UserError is fine (it must be a non-empty message), anything else fails the test."""
    try:
        out = fn(*args)
        COUNTS[f"{kind}: accepted"] += 1
        return out
    except UserError as e:
        assert str(e).strip(), "empty UserError"
        COUNTS[f"{kind}: UserError"] += 1
        return None


# --------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.tokenizer_utils import load

    return load(tiny_model)


# Short random bytes rarely reach Python's own limits; repeated pieces do (1500 nested arrays pass
# the recursion limit, 4301 digits the int-string limit).
REPEATED = st.builds(lambda pre, piece, n, post: pre + piece * n + post,
                     st.sampled_from([b"", b'{"text": ', b'{"messages": ', b"["]),
                     st.sampled_from([b"[", b'{"a":', b"9", b"-", b"\n", b"\xff", b"\x00", b'"\\ud800', b" "]),
                     st.integers(0, 6000), st.binary(max_size=8))


@fuzz(300)
@given(raw=st.one_of(st.binary(max_size=600), REPEATED), suffix=st.sampled_from([".jsonl", ".json"]))
def test_read_file_on_random_bytes_raises_only_user_errors(scratch, raw, suffix):
    path = scratch / f"bytes{suffix}"
    path.write_bytes(raw)
    _only_user_errors(read_file, path, kind="data bytes")


@fuzz(200)
@given(raw=st.binary(max_size=300), prefix=st.sampled_from([b'{"text": "', b'[{"messages": [', b'{"a": 1}\n']))
def test_read_file_on_damaged_json_raises_only_user_errors(scratch, raw, prefix):
    path = scratch / "damaged.jsonl"
    path.write_bytes(prefix + raw)
    _only_user_errors(read_file, path, kind="data bytes")


# Text with everything JSON can carry: control characters, unpaired surrogates (json.dumps escapes
# them as \ud800), the template's own special tokens, and the roles.
TEXT = st.one_of(st.text(st.characters(codec=None, exclude_categories=()), max_size=20),
                 st.sampled_from(["", " ", "user", "assistant", "system", "tool", "<|im_end|>",
                                  "<|im_start|>assistant\n", "{{ x }}", "\u2028", "\r\n", "a\ud800b"]))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(), TEXT)
KEYS = st.one_of(st.sampled_from(["messages", "role", "content", "text", "prompt", "completion",
                                  "instruction", "input", "output", "tools", "tool_calls"]), TEXT)
JSONISH = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)),
                       max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]),
                                                   SCALAR),
                                 "content": st.one_of(TEXT, SCALAR)})
ROLE = st.sampled_from(["system", "user", "assistant", "tool"])
# Conversations that pass validation (so tokenization, templates and masks get fuzzed too).
VALID_CHAT = st.fixed_dictionaries({"messages": st.lists(
    st.fixed_dictionaries({"role": ROLE, "content": TEXT.filter(str.strip)}), min_size=1, max_size=5).map(
    lambda ms: ms + [{"role": "assistant", "content": "ok"}])})
RECORD = st.one_of(
    VALID_CHAT, VALID_CHAT,
    JSONISH,
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=5)},
                          optional={"tools": JSONISH}),
    st.fixed_dictionaries({"prompt": st.one_of(TEXT, SCALAR), "completion": st.one_of(TEXT, SCALAR)}),
    st.fixed_dictionaries({"instruction": TEXT, "output": TEXT}, optional={"input": st.one_of(TEXT, SCALAR)}),
    st.fixed_dictionaries({"text": st.one_of(TEXT, SCALAR)}),
)


def _json(value) -> str:
    # allow_nan: json.dumps writes NaN/Infinity, which Python's json.loads reads back
    return json.dumps(value)


@fuzz(250)
@given(records=st.lists(RECORD, min_size=1, max_size=3), array=st.booleans())
def test_random_json_records_are_read_and_tokenized_or_refused_with_user_errors(scratch, tokenizer, records, array):
    """Whatever read_file accepts must also tokenize (chat template, masks) without a crash."""
    path = scratch / ("records.json" if array else "records.jsonl")
    path.write_text(_json(records) if array else "".join(_json(r) + "\n" for r in records))
    examples = _only_user_errors(read_file, path, kind="data records")
    if examples:
        tok = _only_user_errors(tokenize_all, examples, tokenizer, 64, kind="tokenize")
        if tok:
            assert all(len(i) == len(m) <= 64 for i, m in zip(tok.ids, tok.masks))


# --------------------------------------------------------------------------- config

FIELDS = ["epochs", "batch_size", "learning_rate", "rank", "alpha", "dropout", "path", "quantize",
          "group_size", "max_seq_length", "target_modules", "log_to", "max_steps", "seed", "resume",
          "valid_fraction", "num_layers", "max_grad_norm", "patience", "dir", "keep_last", "overlong"]
CONFIG_VALUE = st.one_of(SCALAR, st.floats(allow_nan=True, allow_infinity=True),
                         st.integers(-2**70, 2**70), st.lists(SCALAR, max_size=3),
                         st.dictionaries(TEXT, SCALAR, max_size=2), st.sampled_from(["4", "8", "none", "nan"]))
SECTION = st.dictionaries(st.one_of(st.sampled_from(FIELDS), TEXT, st.integers()), CONFIG_VALUE, max_size=5)
PLAUSIBLE = st.fixed_dictionaries({}, optional={
    "training": st.fixed_dictionaries({}, optional={
        "epochs": st.integers(-1, 5), "batch_size": st.one_of(st.integers(-1, 64), st.text(max_size=3)),
        "learning_rate": st.floats(), "max_steps": st.one_of(st.none(), st.integers(-1, 9)),
        "resume": st.one_of(st.booleans(), st.sampled_from(["yes", "off", "2"]))}),
    "lora": st.fixed_dictionaries({}, optional={
        "rank": st.integers(-1, 64), "alpha": st.floats(), "dropout": st.floats(),
        "target_modules": st.one_of(st.lists(TEXT, max_size=2), TEXT, st.integers())}),
    "model": st.fixed_dictionaries({}, optional={
        "quantize": st.sampled_from(["4", "8", "none", 4, 8, 3, None]), "group_size": st.sampled_from([32, 64, 48, "64"])}),
    "output": st.fixed_dictionaries({}, optional={"log_to": st.one_of(st.lists(st.sampled_from(["jsonl", "tensorboard", "x"])), TEXT)})})
TREE = st.one_of(
    PLAUSIBLE, PLAUSIBLE,
    st.dictionaries(st.one_of(st.sampled_from(["model", "data", "lora", "training", "output"]), TEXT),
                    st.one_of(SECTION, SCALAR), max_size=5),
    JSONISH)


@fuzz(400)
@given(tree=TREE)
def test_apply_overrides_and_validate_on_random_trees_raise_only_user_errors(tree):
    cfg = _only_user_errors(lambda t: apply_overrides(Config(), t, "fuzz").validate(), tree, kind="config tree")
    if cfg is not None:  # accepted: every value has its field's type and range
        t = cfg.training
        assert isinstance(t.epochs, int) and t.epochs >= 1 and t.batch_size >= 1
        assert math.isfinite(t.learning_rate) and t.learning_rate > 0 and 0 <= cfg.lora.dropout < 1


YAML_TEXT = st.one_of(
    st.text(st.sampled_from(list("abc:-[]{}!&*?|>'\"#%@` \n\t0123456789.eE+,~") + ["\u00e9", "\x00", "\ufeff"]),
            max_size=80),
    TREE.map(lambda t: yaml.safe_dump(t, allow_unicode=True)),
    st.builds(lambda piece, n: "training:\n  seed: " + piece * n, st.sampled_from(["[", "9", "- ", "{a: "]),
              st.integers(0, 6000)),
    st.sampled_from(["training:\n  seed: 2024-13-45\n", "a: !!binary '@@'\n", "? [a]\n: 1\n",
                     "training: &a [*a]\n", "!!python/object/apply:os.system ['true']\n",
                     "training:\n  epochs: 1e999\n", "lora: {rank: .nan}\n"]),
)


@fuzz(300)
@given(text=YAML_TEXT)
def test_load_yaml_and_resolve_on_random_yaml_raise_only_user_errors(scratch, text):
    path = scratch / "config.yaml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:  # a surrogate from yaml.safe_dump: write the bytes as they are
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _only_user_errors(resolve, str(path), kind="config yaml")


# --------------------------------------------------------------------------- GGUF

_spec = importlib.util.spec_from_file_location("hostile_recipes", Path(__file__).parent / "hostile" / "recipes.py")
recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes)

EXTREMES = [0, 1, 2, 3, 7, 8, 9, 12, 13, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


@pytest.fixture(scope="module")
def good_gguf(tiny_model, tmp_path_factory):
    import gguf

    path = recipes.write_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", tiny_model)
    return path.read_bytes(), gguf.GGUFReader(str(path)).data_offset


def mutations(size: int, header_end: int):
    """Random damage, most of it in the header (where the lengths and offsets are)."""
    pos = st.integers(0, header_end)
    return st.lists(st.one_of(
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("u32"), pos, st.sampled_from(EXTREMES)),
        st.tuples(st.just("u64"), pos, st.sampled_from(EXTREMES)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16)),
        st.tuples(st.just("truncate"), st.integers(0, size), st.just(0)),
    ), min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, at, arg in ops:
        at = min(at, len(b))
        if op == "byte" and at < len(b):
            b[at] = arg
        elif op in ("u32", "u64"):
            fmt, n = ("<I", 4) if op == "u32" else ("<Q", 8)
            b[at:at + n] = struct.pack(fmt, arg % (1 << (8 * n)))
        elif op == "insert":
            b[at:at] = arg
        elif op == "delete":
            del b[at:at + arg]
        elif op == "truncate":
            del b[at:]
    return bytes(b)


def test_the_unmutated_gguf_passes_the_check_and_loads(good_gguf, tmp_path):
    from steadytune.gguf import check_gguf_header, load_gguf

    path = tmp_path / "good.gguf"
    path.write_bytes(good_gguf[0])
    header = check_gguf_header(path)
    assert header.metadata["general.architecture"] == "llama" and len(header.tensors) == 21
    model, tokenizer, config = load_gguf(str(path))
    assert config["num_hidden_layers"] == 2 and tokenizer.encode("hello") != []


@fuzz(400)
@given(data=st.data())
def test_check_gguf_header_on_mutated_files_raises_only_user_errors(good_gguf, scratch, data):
    from steadytune.gguf import check_gguf_header

    good, header_end = good_gguf
    ops = data.draw(mutations(len(good), header_end))
    path = scratch / "mutated.gguf"
    path.write_bytes(mutate(good, ops))
    _only_user_errors(check_gguf_header, path, kind="gguf header")


_LOAD_DRIVER = """
import json, sys
import steadytune, mlx.core as mx
from steadytune.errors import UserError
from steadytune import gguf as g

reached = []
real_load = mx.load
mx.load = lambda *a, **k: (reached.append(1), real_load(*a, **k))[1]
for path in sys.argv[1:]:
    try:
        g.check_gguf_header(path)
        header = "ok"
    except UserError:
        header = "refused"
    reached.clear()
    print(json.dumps({"path": path, "header": header}), flush=True)  # the last line names a crasher
    try:
        g.load_gguf(path)
        outcome = "loaded"
    except UserError:
        outcome = "UserError"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    print(json.dumps({"path": path, "header": header, "mlx_reached": bool(reached), "outcome": outcome}),
          flush=True)
"""


def test_load_gguf_in_a_subprocess_never_hands_a_refused_header_to_mlx(good_gguf, tmp_path):
    """A sample of mutated files through load_gguf in a child process (a native crash would take
    the process down: that shows as a negative exit status and the file it died on)."""
    good, header_end = good_gguf
    rng = np.random.default_rng(0)
    n = max(40, LONG // 50)
    paths = []
    for i in range(n):
        ops = []
        for _ in range(int(rng.integers(1, 4))):
            kind = ["byte", "u32", "u64", "insert", "delete", "truncate"][int(rng.integers(0, 6))]
            at = int(rng.integers(0, len(good) if kind == "truncate" else header_end))
            arg = {"byte": int(rng.integers(0, 256)), "u32": EXTREMES[int(rng.integers(0, len(EXTREMES)))],
                   "u64": EXTREMES[int(rng.integers(0, len(EXTREMES)))],
                   "insert": bytes(rng.integers(0, 256, int(rng.integers(1, 9))).astype(np.uint8)),
                   "delete": int(rng.integers(1, 9)), "truncate": 0}[kind]
            ops.append((kind, at, arg))
        p = tmp_path / f"m{i:04d}.gguf"
        p.write_bytes(mutate(good, ops))
        paths.append(str(p))
    proc = subprocess.run([sys.executable, "-c", _LOAD_DRIVER, *paths], capture_output=True, text=True,
                          env=cli_env(), timeout=600)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0, f"crashed on {lines[-1] if lines else '?'}: {proc.stderr[-2000:]}"
    done = [ln for ln in lines if "outcome" in ln]
    assert len(done) == n
    for r in done:
        assert r["outcome"] in ("loaded", "UserError"), r
        if r["header"] == "refused":
            assert not r["mlx_reached"] and r["outcome"] == "UserError", r
    refused = sum(r["header"] == "refused" for r in done)
    COUNTS["gguf load_gguf subprocess: refused"] += refused
    COUNTS["gguf load_gguf subprocess: header ok"] += n - refused
    assert 0 < refused < n  # the sample holds both kinds
