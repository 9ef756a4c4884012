"""The config tree: defaults < YAML < flags, unknown keys with suggestions, all problems at once."""

import pytest

from steadytune.config import Config, flag_table, resolve
from steadytune.errors import UserError


def test_yaml_then_flags_override_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  batch_size: 2\n  epochs: 5\nlora:\n  rank: 4\n")
    cfg = resolve(f, {"training": {"epochs": "7"}})
    assert (cfg.training.batch_size, cfg.training.epochs, cfg.lora.rank) == (2, 7, 4)
    assert cfg.training.learning_rate == Config().training.learning_rate


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  batchsize: 2\ntrainig:\n  epochs: 1\n")
    with pytest.raises(UserError) as e:
        resolve(f)
    text = e.value.render()
    assert "unknown key 'training.batchsize'; did you mean 'batch_size'?" in text
    assert "unknown section 'trainig'; did you mean 'training'?" in text


def test_every_invalid_value_is_reported_at_once():
    with pytest.raises(UserError) as e:
        resolve(None, {"training": {"batch_size": 0, "learning_rate": -1}, "lora": {"dropout": 1.5}})
    text = e.value.render()
    for part in ("training.batch_size must be at least 1", "training.learning_rate must be a positive",
                 "lora.dropout must be in [0, 1)"):
        assert part in text


def test_wrong_type_names_key():
    with pytest.raises(UserError, match="epochs must be int, got 'many'"):
        resolve(None, {"training": {"epochs": "many"}})


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  epochs: [1\n")
    with pytest.raises(UserError, match=r"c\.yaml:\d+:"):
        resolve(f)


def test_stable_flag_names_exist():
    stable = ["--model", "--data", "--out", "--epochs", "--max-steps", "--batch-size", "--grad-accumulation",
              "--learning-rate", "--lr-schedule", "--warmup-steps", "--seed", "--max-seq-length", "--lora-rank",
              "--lora-alpha", "--lora-dropout", "--quantize", "--eval-every", "--log-every", "--save-every",
              "--resume"]
    assert not set(stable) - set(flag_table())


def test_lora_scale_is_alpha_over_rank():
    cfg = resolve(None, {"lora": {"rank": 8, "alpha": 32}})
    assert cfg.lora.scale == 4.0
