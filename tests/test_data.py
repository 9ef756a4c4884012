"""Data formats, validation messages, hold-out, and loss masks."""

import json

import pytest

from conftest import SHARED_DATA, run_cli, write_jsonl
from steadytune.data import holdout, load_splits, read_file, tokenize, tokenize_all
from steadytune.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


def _err(path) -> UserError:
    with pytest.raises(UserError) as e:
        read_file(path)
    return e.value


@pytest.mark.parametrize("records,kind", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}], "chat"),
    ([{"prompt": "p", "completion": "c"}], "completion"),
    ([{"text": "t"}], "text"),
    ([{"instruction": "i", "input": "", "output": "o"}], "alpaca"),
])
def test_each_format_is_detected(tmp_path, records, kind):
    exs = read_file(write_jsonl(tmp_path / "d.jsonl", records))
    assert [e.kind for e in exs] == [kind]


def test_json_array_file_is_read(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [e.text for e in read_file(p)] == ["a", "b"]


def test_shared_alpaca_and_wikisql_load():
    assert len(read_file(SHARED_DATA / "alpaca_en_demo.json")) == 999
    s = load_splits(SHARED_DATA / "wikisql")
    assert (len(s.train), len(s.valid)) == (1000, 100)


BAD = [
    ("malformed JSON", '{"text": "a"}\n{"text": \n', ":2: malformed JSON"),
    ("empty file", "", "the file is empty"),
    ("missing field", '{"prompt": "p"}\n', ":1: missing field 'completion'"),
    ("empty field", '{"text": "  "}\n', ":1: 'text' is empty"),
    ("unknown role", '{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     ":1: messages[0]: unknown role 'bot'"),
    ("no assistant", '{"messages": [{"role": "user", "content": "x"}]}\n', ":1: no assistant turn"),
    ("non-string content", '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}\n',
     ":1: messages[0]: 'content' must be a string, got int"),
    ("wrong type", '{"messages": "hello"}\n', ":1: 'messages' must be a list"),
    ("not an object", '[1, 2]\n', ":1: a record must be a JSON object"),
    ("mixed formats", '{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', "records mix formats"),
    ("unknown format", '{"question": "q"}\n', ":1: unknown record format"),
]


@pytest.mark.parametrize("name,content,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_data_names_file_and_line(tmp_path, name, content, expected):
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    e = _err(p)
    assert expected in e.render()
    assert str(p) in e.render()


def test_all_problems_reported_up_to_twenty_then_a_count(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": ""}\n' * 25)
    text = _err(p).render()
    assert text.count("'text' is empty") == 20
    assert "... and 5 more problems" in text


@pytest.mark.parametrize("name,content,expected", BAD[:4], ids=[b[0] for b in BAD[:4]])
def test_cli_bad_data_exits_2_without_traceback(tmp_path, name, content, expected):
    p = tmp_path / "train.jsonl"
    p.write_text(content)
    r = run_cli("train", "--data", p, "--out", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and f"{p}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_holdout_is_seeded_five_percent_at_least_one():
    assert len(holdout(100, 0.05, 0)) == 5
    assert len(holdout(10, 0.05, 0)) == 1
    assert holdout(100, 0.05, 3).tolist() == holdout(100, 0.05, 3).tolist()
    assert holdout(100, 0.05, 3).tolist() != holdout(100, 0.05, 4).tolist()


def test_missing_valid_file_holds_out_from_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(40)])
    s = load_splits(tmp_path, 0.05, seed=0)
    assert (len(s.train), len(s.valid)) == (38, 2)
    assert not {e.text for e in s.train} & {e.text for e in s.valid}


def test_mask_covers_exactly_the_assistant_turns(tokenizer):
    from steadytune.data import Example

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the name"},
            {"role": "assistant", "content": "the city"}, {"role": "user", "content": "and the year"},
            {"role": "assistant", "content": "the team"}]
    ids, mask = tokenize(Example("x:1", "chat", messages=msgs), tokenizer)
    # the masked tokens, turn by turn, are each answer followed by the end-of-turn token
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tokenizer.decode(r) for r in runs] == ["the city<|im_end|>", "the team<|im_end|>"]
    # and the whole sequence is the templated conversation, nothing added or lost
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    ids2, mask2 = tokenize(Example("x:1", "chat", messages=msgs), tokenizer, train_on_prompt=True)
    assert ids2 == ids and all(mask2)


def test_completion_and_text_masks(tokenizer):
    from steadytune.data import Example

    ids, mask = tokenize(Example("x:1", "completion", messages=[
        {"role": "user", "content": "count"}, {"role": "assistant", "content": "the name"}]), tokenizer)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "the name<|im_end|>"
    ids, mask = tokenize(Example("x:1", "text", text="select name"), tokenizer)
    assert all(mask) and ids[-1] == tokenizer.eos_token_id


def test_truncate_counts_and_error_mode(tokenizer):
    from steadytune.data import Example

    exs = [Example(f"f:{i}", "text", text="select the name from table " * (i + 1)) for i in range(4)]
    t = tokenize_all(exs, tokenizer, max_seq_length=12)
    assert t.truncated == sum(1 for e in exs if len(tokenize(e, tokenizer)[0]) > 12)
    assert t.truncated >= 2 and max(t.lengths()) == 12
    with pytest.raises(UserError, match="longer than max_seq_length"):
        tokenize_all(exs, tokenizer, max_seq_length=12, overlong="error")
