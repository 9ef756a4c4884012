"""Data formats, validation messages, hold-out, and loss masks."""

import json

import pytest

from conftest import SHARED_DATA, TEST_DATA, needs_shared, run_cli, write_jsonl
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


def test_shared_wikisql_sample_vendored_with_the_tests_loads():
    s = load_splits(TEST_DATA / "wikisql")
    assert (len(s.train), len(s.valid)) == (200, 20)
    assert {e.kind for e in s.train + s.valid} == {"text"}


@needs_shared
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


# --- ShareGPT ----------------------------------------------------------------------------------


def test_sharegpt_records_map_speakers_to_roles(tmp_path):
    recs = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}],
             "system": "top-level system"}]
    exs = read_file(write_jsonl(tmp_path / "d.jsonl", recs))
    assert [e.kind for e in exs] == ["sharegpt", "sharegpt"]
    assert exs[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "yo"}]
    assert exs[1].messages[0] == {"role": "system", "content": "top-level system"}


SHAREGPT_BAD = [
    ("unknown speaker", {"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]},
     ":1: conversations[0]: unknown 'from' 'bot'; use one of human, user, gpt, assistant, system"),
    ("value not a string", {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]},
     ":1: conversations[0]: 'value' must be a string, got int"),
    ("no gpt turn", {"conversations": [{"from": "human", "value": "x"}]}, ":1: no gpt (assistant) turn"),
    ("empty answer", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]},
     ":1: conversations[1]: gpt value is empty"),
    ("not a list", {"conversations": "hello"}, ":1: 'conversations' must be a list"),
    ("turn not an object", {"conversations": ["hi", {"from": "gpt", "value": "y"}]},
     ":1: conversations[0] must be an object with 'from' and 'value'"),
]


@pytest.mark.parametrize("name,record,expected", SHAREGPT_BAD, ids=[b[0] for b in SHAREGPT_BAD])
def test_bad_sharegpt_names_file_and_line(tmp_path, name, record, expected):
    p = write_jsonl(tmp_path / "train.jsonl", [record])
    text = _err(p).render()
    assert f"{p}{expected}" in text


def test_sharegpt_masks_the_gpt_turns(tokenizer, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [
        {"from": "human", "value": "what is the name"}, {"from": "gpt", "value": "the city"}]}])
    ids, mask = tokenize(read_file(p)[0], tokenizer)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "the city<|im_end|>"


# --- max_examples and valid_fraction 0 ---------------------------------------------------------


def test_max_examples_takes_a_seeded_subset_and_leaves_validation_alone(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(40)])
    full = load_splits(tmp_path, 0.05, seed=0)
    few = load_splits(tmp_path, 0.05, seed=0, max_examples=10)
    assert len(few.train) == 10 and {e.text for e in few.train} <= {e.text for e in full.train}
    assert [e.text for e in few.valid] == [e.text for e in full.valid]  # the hold-out does not move
    again = load_splits(tmp_path, 0.05, seed=0, max_examples=10)
    other = load_splits(tmp_path, 0.05, seed=1, max_examples=10)
    assert [e.text for e in again.train] == [e.text for e in few.train]
    assert [e.text for e in other.train] != [e.text for e in few.train]
    assert "training on 10 of 38 training examples" in " ".join(few.notes)
    assert len(load_splits(tmp_path, 0.05, seed=0, max_examples=1000).train) == 38


def test_valid_fraction_zero_trains_on_everything(tmp_path):
    from steadytune.config import from_dict

    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(40)])
    s = load_splits(tmp_path, 0.0, seed=0)
    assert (len(s.train), len(s.valid)) == (40, 0)
    assert "validation is skipped" in " ".join(s.notes)
    assert from_dict({"data": {"valid_fraction": 0}}).data.valid_fraction == 0
    with pytest.raises(UserError, match="max_examples must be at least 1"):
        from_dict({"data": {"max_examples": 0}})


def test_max_examples_and_system_fold_must_match_on_resume():
    from steadytune.config import Config
    from steadytune.runinfo import compare_for_resume

    saved = {"config": Config().to_dict(), "fingerprints": {"data": "d", "model": "m"},
             "adapter_config": {"lora_parameters": {"keys": ["k"]}}}
    cfg = Config()
    cfg.data.max_examples, cfg.data.system_fold = 10, "fold"
    with pytest.raises(UserError) as e:
        # (whatever the model identity check adds, these two lines must be in the refusal)
        compare_for_resume(saved, cfg, {"data": "d", "model": {"legacy": "m"}},
                           {"lora_parameters": {"keys": ["k"]}}, "ckpt")
    assert "data.max_examples: None in the checkpoint, 10 now" in e.value.render()
    assert "data.system_fold: 'auto' in the checkpoint, 'fold' now" in e.value.render()


# --- chat templates without a system role (Mistral v0.2) ---------------------------------------

SYSTEM_CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the name"},
                            {"role": "assistant", "content": "the city"}]}


@pytest.fixture(scope="module")
def mistral_tokenizer(mistral_like):
    from steadytune.model import source_tokenizer

    return source_tokenizer(str(mistral_like))


def test_fold_system_puts_the_system_text_in_the_next_user_turn():
    from steadytune.data import fold_system

    msgs = SYSTEM_CHAT["messages"]
    assert fold_system(msgs) == [{"role": "user", "content": "be brief\n\nthe name"},
                                 {"role": "assistant", "content": "the city"}]
    assert msgs[1]["content"] == "the name"  # the record itself is not changed
    trailing = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "system", "content": "s"}]
    assert fold_system(trailing) == trailing  # no user turn after it: left for the template to judge


def test_template_without_system_role_is_detected(mistral_tokenizer, tokenizer):
    from steadytune.data import template_has_system_role

    assert template_has_system_role(mistral_tokenizer) is False
    assert template_has_system_role(tokenizer) is True  # ChatML


def _splits(tmp_path, records):
    from steadytune.data import Splits

    return Splits(read_file(write_jsonl(tmp_path / "train.jsonl", records)), [])


def test_system_turns_are_folded_on_mistral_and_recorded(tmp_path, mistral_tokenizer, tokenizer):
    from steadytune.config import DataConfig
    from steadytune.data import check_template

    plain = {"messages": SYSTEM_CHAT["messages"][1:]}
    splits, cfg = _splits(tmp_path, [SYSTEM_CHAT, plain, SYSTEM_CHAT]), DataConfig()
    notes = check_template(splits, mistral_tokenizer, cfg)
    assert len(notes) == 1 and "no system role" in notes[0] and "of 2 examples" in notes[0]
    assert cfg.system_fold == "fold"  # what config.yaml records
    assert splits.train[0].messages[0] == {"role": "user", "content": "be brief\n\nthe name"}
    ids, mask = tokenize(splits.train[0], mistral_tokenizer)
    assert mistral_tokenizer.decode(ids) == "[INST] be brief\n\nthe name [/INST]the city<|im_end|>"
    # a template with a system role keeps the turn
    splits, cfg = _splits(tmp_path, [SYSTEM_CHAT]), DataConfig()
    assert check_template(splits, tokenizer, cfg) == [] and cfg.system_fold == "auto"
    assert splits.train[0].messages[0]["role"] == "system"


def test_system_fold_error_names_file_line_and_fix(tmp_path, mistral_tokenizer):
    from steadytune.config import DataConfig
    from steadytune.data import check_template

    splits = _splits(tmp_path, [{"messages": SYSTEM_CHAT["messages"][1:]}, SYSTEM_CHAT])
    with pytest.raises(UserError) as e:
        check_template(splits, mistral_tokenizer, DataConfig(system_fold="error"))
    assert str(e.value).startswith(f"{tmp_path / 'train.jsonl'}:2: the chat template of ")
    assert "has no system role" in str(e.value) and "--system-fold auto" in str(e.value)


def test_other_template_failures_name_file_line_and_roles(tmp_path, mistral_tokenizer):
    from steadytune.config import DataConfig
    from steadytune.data import check_template

    ok = {"messages": SYSTEM_CHAT["messages"][1:]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}]}
    with pytest.raises(UserError) as e:
        check_template(_splits(tmp_path, [ok, ok, bad]), mistral_tokenizer, DataConfig())
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}:3: the chat template of ")
    assert "roles: user, user, assistant" in msg and "Conversation roles must alternate" in msg
    assert "use roles the template accepts" in msg


def _no_weights(folder, tmp_path):
    """A copy of a model folder whose weights file is garbage: whatever reads the weights fails."""
    import shutil

    out = tmp_path / "model"
    shutil.copytree(folder, out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    return out


BAD_TURNS = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}


def cli(capsys, *args) -> tuple[int, str, str]:
    """The command line, in this process (a subprocess costs seconds of imports)."""
    from steadytune.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("command", ["check-data", "plan", "train"])
def test_template_failure_reported_before_the_weights_load(tmp_path, mistral_like, command, capsys):
    model = _no_weights(mistral_like, tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", [SYSTEM_CHAT] * 3 + [BAD_TURNS])
    args = {"check-data": [data, "--model", model],
            "plan": ["--model", model, "--data", data],
            "train": ["--model", model, "--data", data, "--out", tmp_path / "run"]}[command]
    rc, out, err = cli(capsys, command, *args)
    assert rc == 2, out + err
    assert f"{data}:4: the chat template of " in err
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder


def test_check_data_reads_the_tokenizer_only_and_folds(tmp_path, mistral_like, capsys):
    model = _no_weights(mistral_like, tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", [SYSTEM_CHAT] * 3)
    rc, out, err = cli(capsys, "check-data", data, "--model", model)
    assert rc == 0, err
    assert f"tokenizer: {model} (tokenizer and chat template only, no weights loaded)" in out
    assert "no system role: the system turn of 3 examples is folded" in out
    rc, out, err = cli(capsys, "check-data", data, "--model", model, "--system-fold", "error")
    assert rc == 2 and f"{data}:1: the chat template of" in err


def test_check_data_without_model_says_which_tokenizer(tmp_path, monkeypatch, capsys):
    import argparse

    import steadytune.model
    from steadytune.commands.check_data import command as check_data_command

    def no_weights(*a, **k):
        raise AssertionError("check-data loaded model weights")

    monkeypatch.setattr(steadytune.model, "load_base", no_weights)
    monkeypatch.setattr(steadytune.model, "_load_mlx_lm", no_weights)
    data = write_jsonl(tmp_path / "train.jsonl", [SYSTEM_CHAT] * 2)
    args = argparse.Namespace(path=str(data), model=None, max_seq_length=2048, train_on_prompt=False,
                              system_fold="auto", chat_template=None)
    assert check_data_command(args) == 0
    out = capsys.readouterr().out
    assert "tokenizer: smollm2-135m (tokenizer and chat template only, no weights loaded; the default" in out
    assert "records: 2  format: chat" in out


def test_sharegpt_speaker_of_any_json_type_is_a_problem_not_a_crash(tmp_path):
    p = write_jsonl(tmp_path / "train.jsonl", [{"conversations": [{"from": ["human"], "value": "x"},
                                                                  {"from": {"a": 1}, "value": "y"}]}])
    text = _err(p).render()
    assert "conversations[0]: unknown 'from' ['human']" in text and "conversations[1]: unknown 'from'" in text
    assert "no gpt (assistant) turn" in text
