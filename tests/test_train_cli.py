"""A CLI run writes every output, and its adapters load in mlx-lm unchanged and change its output."""

import json

import mlx.core as mx
import pytest
import yaml

from conftest import run_cli

TRAIN_KEYS = {"event", "step", "epoch", "loss", "tokens", "lr", "tok_per_s", "peak_mem_gb"}


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    from conftest import chat_records, write_jsonl

    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", chat_records(20))  # no valid.jsonl: 5% is held out
    out = root / "run"
    r = run_cli("train", "--model", tiny_model, "--data", data, "--out", out, "--epochs", "3",
                "--batch-size", "4", "--learning-rate", "1e-2", "--log-every", "2", "--eval-every", "4",
                "--progress", "lines")
    assert r.returncode == 0, r.stderr
    return tiny_model, out, r


def test_run_folder_has_config_metrics_adapters(run):
    _, out, r = run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["training"]["epochs"] == 3 and cfg["lora"]["rank"] == 8
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["event"] == "train"]
    val = [x for x in recs if x["event"] == "val"]
    assert train and all(TRAIN_KEYS <= set(x) for x in train)
    # 19 train examples (1 held out), 4 a step packed or not -> 5 steps per epoch (the last of 3),
    # 15 in all, logged every 2 and at the end, validated every 4 and at the end
    assert [x["step"] for x in train] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert [x["step"] for x in val] == [4, 8, 12, 15]
    assert train[-1]["loss"] < train[0]["loss"]
    assert "held out 1 of 20" in r.stderr
    ac = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert ac["lora_parameters"] == {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ac["lora_parameters"]["keys"]}
    assert len(ac["lora_parameters"]["keys"]) == 7


def test_metrics_start_with_a_startup_record_of_where_the_time_went(run):
    """One `startup` record, first, written after the first step: seconds spent reading and
    tokenizing the data, planning memory, loading the model, and in the first (compiling) step."""
    _, out, _ = run
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    startup = [x for x in recs if x["event"] == "startup"]
    assert len(startup) == 1 and recs[0] is startup[0] and startup[0]["step"] == 0
    assert all(isinstance(startup[0][k], float) and startup[0][k] >= 0
               for k in ("data_s", "plan_s", "load_s", "compile_s"))


def test_progress_to_a_file_has_no_carriage_returns(run):
    _, _, r = run
    assert "\r" not in r.stderr and "step 15/15" in r.stderr


def test_adapters_load_in_mlx_lm_and_change_its_output(run):
    from mlx_lm.utils import load

    model_dir, out, _ = run
    base, tok = load(str(model_dir))
    tuned, _ = load(str(model_dir), adapter_path=str(out / "adapters"))
    x = mx.array([tok.encode("select the name from table")])
    diff = mx.abs(base(x) - tuned(x)).max().item()
    assert diff > 1e-2


def test_generate_command_answers_with_adapters(run):
    model_dir, out, _ = run
    r = run_cli("generate", "--adapter", out, "--prompt", "select the name", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "with the adapters" in r.stderr  # the run's adapters are applied
    base = run_cli("generate", "--model", model_dir, "--prompt", "select the name", "--max-tokens", "5")
    # 15 steps at lr 1e-2 on short answers: the tuned model may end its turn at once (an empty
    # answer); the base model does not, so the answers differ either way
    assert base.returncode == 0 and base.stdout.strip() and base.stdout != r.stdout


def test_check_data_prints_statistics(run, tmp_path):
    model_dir, _, _ = run
    from conftest import chat_records, write_jsonl

    f = write_jsonl(tmp_path / "train.jsonl", chat_records(10))
    r = run_cli("check-data", f, "--model", model_dir, "--max-seq-length", "20")
    assert r.returncode == 0, r.stderr
    assert "records: 10  format: chat" in r.stdout and "longer than max_seq_length 20:" in r.stdout
    assert "target tokens per epoch:" in r.stdout and "p50" in r.stdout
