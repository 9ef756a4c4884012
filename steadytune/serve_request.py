"""What one request to `steadytune serve` may ask: its JSON body parsed with bounds, and every
field mlx-lm's generation reads checked against the served model before anything is queued.

mlx-lm's own checks are types only; a value inside its type but outside what the model or MLX
accepts (`top_k` at the vocabulary size, a NaN `min_p`, a `logit_bias` id past the vocabulary, a
seed over 64 bits, a stop "word" that is a number) used to reach the generation thread and kill
it, or crash MLX. Here every field is refused with a 400 that names it. Pure functions of the
body and the model's limits: tested without a server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

MAX_JSON_DEPTH = 64  # a chat request nests a few levels (tool schemas a few more); deeper is an attack
MAX_STOP_WORDS, MAX_STOP_CHARS = 16, 256
MAX_LOGIT_BIAS = 1024
MIN_TEMPERATURE = 1e-4  # below it 1/temperature scales logits past float32 (inf): use 0 for greedy
MAX_TEMPERATURE = 100.0
SEED_LIMIT = 2 ** 64  # mx.random.seed takes an unsigned 64-bit integer
# apply_chat_template's own parameters: a request's chat_template_kwargs may not set them (a
# duplicate keyword or `return_dict` would break the generation thread, not the request)
TEMPLATE_PARAMETERS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class RequestError(ValueError):
    """A request the server refuses with 400; `field` names the offending field (OpenAI's `param`)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the served model's facts and the server's settings."""

    vocab: int          # token ids a request may name (top_k, logit_bias, top_logprobs)
    context: int        # the model's context in tokens
    max_tokens: int     # the server's cap on an answer (serve --max-tokens)
    temperature: float  # the default when a request gives none (serve --temperature)


def temperature_problem(value) -> str | None:
    """Why `value` is not a usable temperature, or None. One rule for serve's requests and the
    --temperature flags of generate, chat and serve."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number (got {value!r})"
    if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        return (f"must be 0 (greedy) or from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g} (got {value!r})")
    return None


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, nested at most MAX_JSON_DEPTH levels."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(None, f"the body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:  # the C parser's own limit (about 1,000 levels): refused, not a crash
        raise RequestError(None, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise RequestError(None, f"invalid JSON in the body: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(None, "the body must be a JSON object")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise RequestError(None, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def json_depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion (a deep value must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_request(body: dict, chat: bool, limits: ModelLimits) -> dict:
    """The settings mlx-lm's handler reads (its attribute names), each checked against `limits`;
    raises RequestError naming the first bad field. A null field counts as absent; fields mlx-lm
    does not use are ignored (OpenAI clients send some, such as `user`)."""
    f = _Fields(body)
    if f.get("n") not in (None, 1):
        raise RequestError("n", f"only 1 answer per request is supported (got {f.get('n')!r})")
    max_tokens = f.integer("max_completion_tokens", None, 1, None)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", limits.max_tokens, 1, None)
    temperature = f.get("temperature", limits.temperature)
    if problem := temperature_problem(temperature):
        raise RequestError("temperature", problem)
    return dict(
        messages=_messages(f.get("messages")) if chat else None,
        prompt=None if chat else f.string("prompt", None, required=True),
        tools=f.dicts("tools", 128),
        role_mapping=f.string_map("role_mapping"),
        stream=f.boolean("stream", False),
        stream_options=_stream_options(f.get("stream_options")),
        requested_model=f.string("model", "default_model"),
        requested_draft_model=f.string("draft_model", "default_model"),
        adapter=None,  # the served run's adapters only (LoadedModelProvider ignores any other)
        num_draft_tokens=f.integer("num_draft_tokens", 3, 0, 64),
        max_tokens=min(max_tokens, limits.max_tokens),  # the server's cap, whatever is asked
        temperature=float(temperature),
        top_p=f.number("top_p", 1.0, 0, 1),
        top_k=f.integer("top_k", 0, 0, limits.vocab - 1, "the vocabulary has "
                        f"{limits.vocab} tokens; 0 turns top_k off"),
        min_p=f.number("min_p", 0.0, 0, 1),
        repetition_penalty=f.number("repetition_penalty", 0.0, 0, 10, positive_from=0.01),
        repetition_context_size=f.integer("repetition_context_size", 20, 0, limits.context),
        presence_penalty=f.number("presence_penalty", 0.0, -2, 2),
        presence_context_size=f.integer("presence_context_size", 20, 0, limits.context),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2, 2),
        frequency_context_size=f.integer("frequency_context_size", 20, 0, limits.context),
        xtc_probability=f.number("xtc_probability", 0.0, 0, 1),
        xtc_threshold=f.number("xtc_threshold", 0.1, 0, 0.5),
        logit_bias=_logit_bias(f.get("logit_bias"), limits.vocab),
        logprobs=f.boolean("logprobs", False),
        top_logprobs=f.integer("top_logprobs", -1, -1, min(20, limits.vocab)),
        seed=f.integer("seed", None, 0, SEED_LIMIT - 1),
        chat_template_kwargs=_template_kwargs(f.get("chat_template_kwargs")),
        stop_words=_stop_words(f.get("stop")),
    )


class _Fields:
    """Typed reads of a request body's fields; each refusal names the field."""

    def __init__(self, body: dict):
        self.body = body

    def get(self, name, default=None):
        value = self.body.get(name)
        return default if value is None else value

    def number(self, name, default, lo, hi, positive_from=None) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RequestError(name, f"must be a finite number (got {v!r})")
        if not lo <= v <= hi or (positive_from and 0 < v < positive_from):
            more = " (or 0 to turn it off)" if positive_from else ""
            low = positive_from if positive_from else lo
            raise RequestError(name, f"must be from {low:g} to {hi:g}{more} (got {v!r})")
        return float(v)

    def integer(self, name, default, lo, hi, why: str = ""):
        v = self.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(name, f"must be an integer (got {v!r})")
        if v < lo or (hi is not None and v > hi):
            limit = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise RequestError(name, f"must be {limit} (got {_short(v)})" + (f": {why}" if why else ""))
        return v

    def boolean(self, name, default) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise RequestError(name, f"must be true or false (got {_short(v)})")
        return v

    def string(self, name, default, required=False):
        v = self.get(name, default)
        if v is None and required:
            raise RequestError(name, "is required")
        if v is not None and not isinstance(v, str):
            raise RequestError(name, f"must be a string (got {_short(v)})")
        return v

    def dicts(self, name, most):
        v = self.get(name)
        if v is not None and not (isinstance(v, list) and len(v) <= most
                                  and all(isinstance(x, dict) for x in v)):
            raise RequestError(name, f"must be a list of at most {most} objects")
        return v or None

    def string_map(self, name):
        v = self.get(name)
        if v is not None and not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())):
            raise RequestError(name, "must be an object of strings")
        return v


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _messages(messages) -> list[dict]:
    """The chat messages with each content as one string (text parts joined, null as ""): the
    form mlx-lm renders, so that the chat template is tried on exactly what will be generated."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise RequestError(where, "must be an object with a string role")
        content = m.get("content")
        if isinstance(content, list):
            content = _text_parts(content, where)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise RequestError(f"{where}.content", "must be a string or a list of text parts "
                               f"(got {_short(content)})")
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function", {}), dict) for c in calls)):
            raise RequestError(f"{where}.tool_calls", "must be a list of {function: {...}} objects")
        for j, call in enumerate(calls or []):
            args = (call.get("function") or {}).get("arguments")
            if isinstance(args, str) and args:  # mlx-lm parses it before rendering
                try:
                    json.loads(args)
                except (ValueError, RecursionError):
                    raise RequestError(f"{where}.tool_calls[{j}].function.arguments",
                                       "must be a JSON text") from None
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise RequestError(f"{where}.{key}", "must be a string")
        out.append(dict(m, content=content))
    return out


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, p in enumerate(parts):
        if isinstance(p, dict) and p.get("type") in ("image_url", "input_image", "image"):
            raise RequestError(f"{where}.content[{j}]", "this model reads text only; remove the image parts")
        if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
            raise RequestError(f"{where}.content[{j}]", 'must be {"type": "text", "text": "..."}')
        texts.append(p["text"])
    return "".join(texts)


def _stream_options(v):
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("include_usage", False), bool):
        raise RequestError("stream_options", 'must be {"include_usage": true or false}')
    return {"include_usage": v.get("include_usage", False)}


def _logit_bias(v, vocab: int):
    if v is None:
        return None
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise RequestError("logit_bias", f"must be an object of at most {MAX_LOGIT_BIAS} "
                           "token id: bias pairs")
    out = {}
    for key, bias in v.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < vocab):
            raise RequestError("logit_bias", f"token id {key[:20]!r} is not one of the model's "
                               f"0 to {vocab - 1}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RequestError("logit_bias", f"the bias of token {key} must be a number from -100 "
                               f"to 100 (got {_short(bias)})")
        out[int(key)] = float(bias)
    return out


def _stop_words(v) -> list[str]:
    words = [] if v is None else [v] if isinstance(v, str) else v
    if not (isinstance(words, list) and len(words) <= MAX_STOP_WORDS and all(
            isinstance(w, str) and 0 < len(w) <= MAX_STOP_CHARS for w in words)):
        raise RequestError("stop", f"must be a string or a list of at most {MAX_STOP_WORDS} "
                           f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    return words


def _template_kwargs(v):
    if v is None:
        return None
    if not isinstance(v, dict) or len(v) > 16:
        raise RequestError("chat_template_kwargs", "must be an object of at most 16 settings")
    for key, value in v.items():
        if key in TEMPLATE_PARAMETERS or not key.isidentifier():
            raise RequestError("chat_template_kwargs", f"{key[:40]!r} cannot be set by a request")
        if not (value is None or isinstance(value, (str, bool, int))
                or (isinstance(value, float) and math.isfinite(value))):
            raise RequestError("chat_template_kwargs", f"{key}: a string, number or boolean")
    return v
