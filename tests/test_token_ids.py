"""The token ids of every record format, for every kind of tokenizer: exactly what the model sees at
inference (mlx_lm.generate and mlx-lm's text dataset are the reference), BOS once, EOS where the
format ends a turn, nothing else. And the proof that matters: with the weights not moving, the
training loss of an epoch is the model's own negative log-likelihood of the same texts.

The tokenizers are built offline. Word-level ones split on whitespace, so every expectation below
is a list of whole tokens a reader can check by hand against the chat template beside it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_DATA, build_model, run_cli, write_jsonl

from steadytune.data import prompt_ids, tokenize
from steadytune.errors import UserError
from steadytune.formats import read_file
from steadytune.model import load_tokenizer
from steadytune.pairs import tokenize_pair

WORDS = ["hi", "yes", "no", "hello", "world", "What", "is", "it?", "Q:", "user", "model", "assistant",
         "[INST]", "[/INST]", "system", "be", "brief"]
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
GEMMA3 = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
          "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Mistral-7B-Instruct-v0.2's template (as in conftest, with its BOS); v0.3's writes [INST] and
# [/INST] as control tokens and a space before each answer.
MISTRAL_V02 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
               "{% endif %}{% endfor %}")
MISTRAL_V03 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
               "{{ '[INST] ' + message['content'] + '[/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
               "{% endif %}{% endfor %}")


def word_tokenizer(folder: Path, specials: list[str], bos: str | None, eos: str, template: str | None,
                   eos_ids: list[str] | None = None, controls=()):
    """A word-level tokenizer folder: `specials` first (ids 0..), then WORDS less `controls`; the
    BOS added by a TemplateProcessing post-processor (add_bos_token: true), as Llama 2, Mistral
    and Gemma tokenizers add theirs; config.json's eos_token_id lists `eos_ids` (end of turn)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(specials + [w for w in WORDS if w not in controls])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "unk_token": "<unk>", "add_bos_token": bool(bos)}
    if template:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [vocab[t] for t in eos_ids or [eos]]}))
    return load_tokenizer(str(folder), config_eos=True)


def gguf_tokenizer(template: str | None):
    """A SentencePiece ("llama") GGUF vocabulary, built as steadytune builds a GGUF file's tokenizer:
    BOS added (the GGUF default for SentencePiece), [INST]/[/INST] control tokens."""
    from steadytune.gguf import build_tokenizer

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "▁hell", "▁hello", "or", "▁w", "▁wor",
              "ld", "▁world", "i", "hi", "▁hi", "y", "s", "es", "yes", "▁yes", "n", "no", "▁no"]
    tokens = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 261 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.token_type": [2, 3, 3, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    if template:
        meta["tokenizer.chat_template"] = template
    return build_tokenizer(meta)


GGUF_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    from conftest import build_tokenizer

    root = tmp_path_factory.mktemp("kinds")
    (root / "bpe").mkdir()
    build_tokenizer(root / "bpe")
    (root / "bpe" / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    llama2 = ["<unk>", "<s>", "</s>"]
    gemma = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    llama3 = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    v3 = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    return {
        "bpe": load_tokenizer(str(root / "bpe"), config_eos=True),  # SmolLM2-like: no BOS, ChatML
        "llama2": word_tokenizer(root / "llama2", llama2, "<s>", "</s>", LLAMA2),
        "llama2-base": word_tokenizer(root / "llama2-base", llama2, "<s>", "</s>", None),
        "gemma": word_tokenizer(root / "gemma", gemma, "<bos>", "<eos>", GEMMA3, ["<eos>", "<end_of_turn>"]),
        "gemma-base": word_tokenizer(root / "gemma-base", gemma, "<bos>", "<eos>", None, ["<eos>", "<end_of_turn>"]),
        "llama3": word_tokenizer(root / "llama3", llama3, "<|begin_of_text|>", "<|eot_id|>", LLAMA3,
                                 ["<|end_of_text|>", "<|eot_id|>"]),
        "mistral-v0.2": word_tokenizer(root / "v02", llama2, "<s>", "</s>", MISTRAL_V02),
        "mistral-v0.3": word_tokenizer(root / "v03", v3, "<s>", "</s>", MISTRAL_V03, controls=("[INST]", "[/INST]")),
        "gguf": gguf_tokenizer(GGUF_TEMPLATE),
        "gguf-base": gguf_tokenizer(None),
    }


RECORDS = {
    "text": {"text": "What is it?"},
    "completion": {"prompt": "Q: hi", "completion": " yes"},  # a base model reads prompt + completion as one text
    "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                          {"role": "user", "content": "hello world"}, {"role": "assistant", "content": "no"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]},
    "alpaca": {"instruction": "hi", "input": "hello world", "output": "no"},
}
GGUF_RECORDS = {"text": {"text": "hello world"}, "completion": {"prompt": "hi", "completion": " yes"},
                "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}}

# Per kind and format: the tokens, [in brackets] those in the loss. Hand-checked against the
# template: BOS once (written by the template, never added again by encoding), the turn's end
# token in the loss, text records and base-model completions as the tokenizer encodes them + EOS.
EXPECTED = {
    "llama2": {
        "text": "<s> [What] [is] [it?] [</s>]",
        "completion": "<s> [INST] Q: hi [/INST] [yes] [</s>]",
        "chat": "<s> [INST] hi [/INST] [yes] [</s>] [INST] hello world [/INST] [no] [</s>]",
        "sharegpt": "<s> [INST] hi [/INST] [yes] [</s>]",
        "alpaca": "<s> [INST] hi hello world [/INST] [no] [</s>]",
    },
    "llama2-base": {
        "text": "<s> [What] [is] [it?] [</s>]",
        "completion": "<s> Q: hi [yes] [</s>]",
    },
    "gemma": {
        "text": "<bos> [What] [is] [it?] [<eos>]",
        "completion": "<bos> <start_of_turn> user Q: hi <end_of_turn> <start_of_turn> model [yes] [<end_of_turn>]",
        "chat": "<bos> <start_of_turn> user hi <end_of_turn> <start_of_turn> model [yes] [<end_of_turn>] "
                "<start_of_turn> user hello world <end_of_turn> <start_of_turn> model [no] [<end_of_turn>]",
        "sharegpt": "<bos> <start_of_turn> user hi <end_of_turn> <start_of_turn> model [yes] [<end_of_turn>]",
        "alpaca": "<bos> <start_of_turn> user hi hello world <end_of_turn> <start_of_turn> model [no] [<end_of_turn>]",
    },
    "gemma-base": {
        "text": "<bos> [What] [is] [it?] [<eos>]",
        "completion": "<bos> Q: hi [yes] [<eos>]",
    },
    "llama3": {
        "text": "<|begin_of_text|> [What] [is] [it?] [<|eot_id|>]",
        "chat": "<|begin_of_text|> <|start_header_id|> user <|end_header_id|> hi <|eot_id|> <|start_header_id|> "
                "assistant <|end_header_id|> [yes] [<|eot_id|>] <|start_header_id|> user <|end_header_id|> hello "
                "world <|eot_id|> <|start_header_id|> assistant <|end_header_id|> [no] [<|eot_id|>]",
    },
    "mistral-v0.2": {
        "text": "<s> [What] [is] [it?] [</s>]",
        "chat": "<s> [INST] hi [/INST] [yes] [</s>] [INST] hello world [/INST] [no] [</s>]",
    },
    "mistral-v0.3": {
        "text": "<s> [What] [is] [it?] [</s>]",
        "chat": "<s> [INST] hi [/INST] [yes] [</s>] [INST] hello world [/INST] [no] [</s>]",
        "alpaca": "<s> [INST] hi hello world [/INST] [no] [</s>]",
    },
    "gguf": {
        "text": "<s> [▁hello] [▁world] [</s>]",
        "chat": "<s> [INST] ▁hi [/INST] [▁yes] [</s>]",
    },
    "gguf-base": {
        "text": "<s> [▁hello] [▁world] [</s>]",
        "completion": "<s> ▁hi [▁yes] [</s>]",
    },
}


def example(tmp_path, record):
    return read_file(write_jsonl(tmp_path / "r.jsonl", [record]))[0]


def show(tok, ids, mask) -> str:
    """The tokens, [in brackets] those in the loss (the first predicts nothing, so never)."""
    return " ".join(f"[{t}]" if m and i else t for i, (t, m) in enumerate(zip(tok.convert_ids_to_tokens(ids), mask)))


@pytest.mark.parametrize("kind,fmt", [(k, f) for k, v in EXPECTED.items() for f in v])
def test_ids_of_each_format_are_what_the_model_sees(kinds, kind, fmt, tmp_path):
    tok = kinds[kind]
    records = GGUF_RECORDS if kind.startswith("gguf") else RECORDS
    ids, mask = tokenize(example(tmp_path, records[fmt]), tok)
    assert show(tok, ids, mask) == EXPECTED[kind][fmt]
    if tok.bos_token:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.parametrize("kind", ["bpe", "llama2", "gemma", "llama3", "mistral-v0.3", "gguf", "gemma-base"])
def test_the_prompt_of_a_record_is_what_generate_gives_the_model(kinds, kind, tmp_path):
    """prompt_ids (generate, chat, serve) = the ids before the first answer token in training =
    mlx_lm.generate's own: the template rendered as text, encoded without adding special tokens
    (or, without a template, the prompt encoded with them)."""
    tok = kinds[kind]
    ids, mask = tokenize(example(tmp_path, {"prompt": "hi", "completion": " yes"}), tok)
    prompt = prompt_ids(tok, [{"role": "user", "content": "hi"}])
    assert ids[: mask.index(True)] == prompt
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert prompt == tok.encode(text, add_special_tokens=False)
    else:
        assert prompt == tok.encode("hi")


@pytest.mark.parametrize("kind", ["llama2", "gemma", "gemma-base"])
def test_serve_counts_the_prompt_ids_that_training_gives_the_model(kinds, kind):
    """The server's context check counts a request's prompt with the same function (chat and
    completion), and a template that fails on the request's messages is the request's 400."""
    from types import SimpleNamespace

    from steadytune.serve import prompt_tokens
    from steadytune.serve_request import RequestError

    tok = kinds[kind]
    chat = SimpleNamespace(request_type="chat", messages=[{"role": "user", "content": "hi"}], tools=None)
    text = SimpleNamespace(request_type="text", prompt="hello world", messages=[], tools=None)
    assert prompt_tokens(tok, chat, 4096, 16) == (len(prompt_ids(tok, chat.messages)), True)
    assert prompt_tokens(tok, text, 4096, 16) == (len(tok.encode("hello world")), True)


class Refusing:
    """A tokenizer whose chat template rejects every conversation, as raise_exception() does."""
    chat_template = "{{ raise_exception('Conversation roles must alternate') }}"

    def apply_chat_template(self, *args, **kwargs):
        from jinja2.exceptions import TemplateError
        raise TemplateError("Conversation roles must alternate")


def test_serve_answers_a_template_that_rejects_the_messages_with_400():
    from types import SimpleNamespace

    from steadytune.serve import prompt_tokens
    from steadytune.serve_request import RequestError

    chat = SimpleNamespace(request_type="chat", messages=[{"role": "user", "content": "hi"}], tools=None)
    with pytest.raises(RequestError, match=r"chat template cannot render them \(TemplateError: "
                                           r"Conversation roles must alternate; roles: user\)$"):
        prompt_tokens(Refusing(), chat, 4096, 16)


def test_bpe_without_bos_adds_nothing_but_eos(kinds, tmp_path):
    tok = kinds["bpe"]
    text = "select the name from table"
    ids, mask = tokenize(example(tmp_path, {"text": text}), tok)
    assert ids == tok.encode(text) + [tok.eos_token_id] and all(mask)
    ids, mask = tokenize(example(tmp_path, {"prompt": "hi", "completion": "the name"}), tok)
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nthe name<|im_end|>\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "the name<|im_end|>"


PAIRS = {"llama2": "<s> [INST] hi [/INST] [yes] [</s>]",
         "gemma": "<bos> <start_of_turn> user hi <end_of_turn> <start_of_turn> model [yes] [<end_of_turn>]",
         "gguf-base": "<s> ▁hi [▁yes] [</s>]"}


@pytest.mark.parametrize("kind", list(PAIRS))
def test_preference_pairs_share_the_prompt_ids(kinds, kind):
    from steadytune.pairs import Pair

    tok = kinds[kind]
    yes, no = (" yes", " no") if kind.startswith("gguf") else ("yes", "no")
    pair = Pair("p.jsonl:1", [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": yes}],
                [{"role": "assistant", "content": no}])
    c, cm, r, rm, _ = tokenize_pair(pair, tok, 64)
    assert show(tok, c, cm) == PAIRS[kind]
    assert c.count(tok.bos_token_id) == 1 and c[0] == tok.bos_token_id
    assert c[: cm.index(True)] == r[: rm.index(True)] == prompt_ids(tok, pair.prompt)
    assert c[-1] in tok.eos_token_ids and r[-1] in tok.eos_token_ids


def test_text_that_writes_its_own_bos_gets_it_once(kinds, tmp_path):
    tok = kinds["gemma-base"]
    ids, mask = tokenize(example(tmp_path, {"text": "<bos>What is it?"}), tok)
    assert show(tok, ids, mask) == "<bos> [What] [is] [it?] [<eos>]"


def test_chat_records_on_a_base_model_name_the_chat_template_option(kinds, tmp_path):
    for fmt in ("chat", "sharegpt", "alpaca"):
        with pytest.raises(UserError, match=r"r\.jsonl:1: .*no chat template.*--chat-template FILE"):
            tokenize(example(tmp_path, RECORDS[fmt]), kinds["gemma-base"])


def test_chat_template_option_formats_chat_records_on_a_base_model(kinds, tmp_path):
    from steadytune.config import DataConfig
    from steadytune.data import Splits, check_template

    tok = word_tokenizer(tmp_path / "base", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                         "<bos>", "<eos>", None, ["<eos>", "<end_of_turn>"])
    (tmp_path / "t.jinja").write_text(GEMMA3)
    cfg = DataConfig(chat_template=str(tmp_path / "t.jinja"))
    ex = example(tmp_path, RECORDS["sharegpt"])
    check_template(Splits([ex], []), tok, cfg)
    assert show(tok, *tokenize(ex, tok)) == EXPECTED["gemma"]["sharegpt"]
    assert Path(cfg.chat_template).is_absolute()  # recorded so that generate finds it from anywhere
    with pytest.raises(UserError, match="--chat-template .*missing.jinja: cannot read"):
        check_template(Splits([ex], []), tok, DataConfig(chat_template=str(tmp_path / "missing.jinja")))


# --- the training loss of an epoch is the model's own NLL ---------------------------------------


def with_bos_tokenizer(folder: Path) -> Path:
    """Replace a build_model folder's tokenizer by a SentencePiece-style BPE (▁ for spaces) that
    adds a BOS <s> through its post-processor (Llama 2's way), trained on the same corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from conftest import _corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    return folder


def own_nll(folder: Path, texts: list[str], drop_bos: bool = False) -> tuple[float, int]:
    """(mean NLL per target token, target tokens) of the model on `texts`, straight through
    mlx-lm: `tokenizer.encode` ids + EOS (its text dataset), `model(ids)`; `drop_bos`: without
    the BOS the tokenizer adds."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    model, tok = load(str(folder))
    total, n = 0.0, 0
    for text in texts:
        ids = tok.encode(text) + [tok.eos_token_id]
        if drop_bos and ids[0] == tok.bos_token_id:
            ids = ids[1:]
        x = mx.array([ids])
        total += nn.losses.cross_entropy(model(x[:, :-1]).astype(mx.float32), x[:, 1:], reduction="sum").item()
        n += len(ids) - 1
    return total / n, n


@pytest.mark.parametrize("kind", ["bpe-no-bos", "with-bos"])
def test_epoch_loss_at_learning_rate_1e_12_is_the_models_own_nll(tmp_path, kind):
    folder = build_model(tmp_path / "model", seed=3)
    if kind == "with-bos":
        with_bos_tokenizer(folder)
    texts = [json.loads(x)["text"] for x in (TEST_DATA / "wikisql" / "train.jsonl").read_text().splitlines()[:12]]
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts])
    r = run_cli("train", "--model", folder, "--data", data, "--out", tmp_path / "run", "--quantize", "none",
                "--learning-rate", "1e-12", "--pack", "false", "--epochs", "1", "--batch-size", "4",
                "--valid-fraction", "0", "--log-every", "1", "--progress", "none")
    assert r.returncode == 0, r.stderr
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "train"]
    tokens = sum(s["tokens"] for s in steps)
    trained = sum(s["loss"] * s["tokens"] for s in steps) / tokens
    nll, n = own_nll(folder, texts)
    assert tokens == n  # every text token and its EOS, the BOS predicting the first
    # Both sides are float32 sums of the same terms in another order: each logit a dot product of
    # hidden (64) terms, each mean a sum of n terms; the adapters move by about 1e-12.
    bound = np.finfo(np.float32).eps * (64 + n) * max(1.0, nll)
    assert abs(trained - nll) <= bound, (trained, nll, bound)
    if kind == "with-bos":  # the BOS matters by far more than the bound: the test can fail
        assert abs(own_nll(folder, texts, drop_bos=True)[0] - nll) > bound


def test_check_data_shows_the_first_example_with_its_bos(kinds, tmp_path, capsys):
    """check-data --model prints the first training example's ids decoded, so a user sees the BOS
    and EOS the run trains on; --chat-template formats chat records for a base model."""
    from steadytune.cli import main

    folder = tmp_path / "gemma-base"
    word_tokenizer(folder, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                   "<bos>", "<eos>", None, ["<eos>", "<end_of_turn>"])
    text = write_jsonl(tmp_path / "text.jsonl", [RECORDS["text"]] * 2)
    assert main(["check-data", str(text), "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "first example, 5 tokens (id:text, [in the loss]): 2:<bos> 11:[What] 12:[is] 13:[it?] 1:[<eos>]" in out
    chat = write_jsonl(tmp_path / "chat.jsonl", [RECORDS["sharegpt"]] * 2)  # SFT records, not pairs
    assert main(["check-data", str(chat), "--model", str(folder)]) == 2
    assert "--chat-template FILE" in capsys.readouterr().err
    (tmp_path / "gemma.jinja").write_text(GEMMA3)
    assert main(["check-data", str(chat), "--model", str(folder), "--chat-template", str(tmp_path / "gemma.jinja")]) == 0
    out = capsys.readouterr().out  # <end_of_turn> ends the answer: an end-of-turn id of the model's config
    assert "2:<bos> 4:<start_of_turn> 15:user 6:hi 5:<end_of_turn> 4:<start_of_turn> 16:model 7:[yes] " \
           "5:[<end_of_turn>]\n" in out


# --- the planner and a large vocabulary ---------------------------------------------------------


def test_planner_counts_a_262k_vocabulary_within_15_percent(tmp_path, capsys):
    """Gemma 3's 262,144-token vocabulary on a tiny gemma3_text (hidden 64): the logits and the
    chunked loss are most of the step's memory. The planner's MLX peak against a real step's
    mx.get_peak_memory (the run's peak_mem_gb), on the CPU."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma3_text

    from conftest import build_tokenizer
    from steadytune.cli import main

    folder = tmp_path / "gemma"
    folder.mkdir()
    build_tokenizer(folder)
    cfg = dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
               num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=262144, rms_norm_eps=1e-6,
               sliding_window=512, max_position_embeddings=4096, rope_theta=10000.0, query_pre_attn_scalar=16,
               eos_token_id=2)
    mx.random.seed(0)
    weights = dict(tree_flatten(gemma3_text.Model(gemma3_text.ModelArgs.from_dict(cfg)).parameters()))
    weights.pop("lm_head.weight")  # tied, as Gemma 3's
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(cfg))
    # every step the planner's largest: examples of one length (361 tokens), one a micro-batch:
    # 3 loss chunks of 128 tokens (bench/token_ids.py checks Gemma 3 270M itself at batch 4)
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(["select the name from table where count"] * 22)}] * 2)
    args = ["--model", folder, "--data", data, "--valid-fraction", "0", "--pack", "false", "--batch-size", "1"]
    assert main(["plan", *map(str, args)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "of which MLX" in x)
    predicted = float(line.split()[-1])
    r = run_cli("train", *args, "--max-steps", "1", "--log-every", "1", "--out", tmp_path / "run", "--progress", "none")
    assert r.returncode == 0, r.stderr
    peak = max(json.loads(x).get("peak_mem_gb", 0) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert abs(predicted - peak) <= 0.15 * peak, (predicted, peak)
