"""Hostile and broken inputs (tests/hostile/cases.yaml): every case, run through the real CLI in a
subprocess, exits 2 with one `error:` line naming the file and the fix, no traceback, and no run
folder a later --resume would trust. Then the loading policy (no pickle, no remote code, sandboxed
chat templates) and running out of memory or disk mid-run, in-process.

Cost: one CLI process per case, two at a time, and one process for all the resume checks: about
65 s of CPU in all (most cases fail before any model loads; about 40 load the tiny model or its
tokenizer, each ~1 s more).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, build_model, cli_env, make_chat_data, run_cli
from steadytune.errors import UserError

HOSTILE = Path(__file__).parent / "hostile"
CASES = yaml.safe_load((HOSTILE / "cases.yaml").read_text())
_spec = importlib.util.spec_from_file_location("hostile_recipes", HOSTILE / "recipes.py")
recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes)


def test_corpus_has_at_least_40_cases_each_with_its_input_and_expected_message():
    names = [c["name"] for c in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)
    for c in CASES:
        assert c["expect"], c["name"]
        assert "input" not in c or (HOSTILE / c["input"]).exists(), c["name"]
        assert "recipe" not in c or c["recipe"] in recipes.RECIPES, c["name"]


# --------------------------------------------------------------------------- running the corpus

@pytest.fixture(scope="module")
def ctx(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = make_chat_data(root / "data", 8)
    gguf = recipes.write_gguf(root / "tiny.gguf", tiny_model)
    return SimpleNamespace(root=root, tiny=tiny_model, data=data, gguf=gguf)


def _has_flag(args, flag):
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _fill(text: str, subs: dict) -> str:
    for key, value in subs.items():
        text = text.replace("{" + key + "}", value)
    return text


def _argv(case, subs) -> list[str]:
    args = [_fill(a, subs) for a in case.get("args", [])]
    cmd = case.get("cmd", "train")
    if cmd == "train":
        for flag, key in (("--data", "data"), ("--model", "tiny"), ("--out", "out")):
            if not _has_flag(args, flag):
                args += [flag, subs[key]]
        args += ["--max-steps", "2"]
    return [cmd, *args]


def _run_case(case, ctx):
    work = ctx.root / "cases" / case["name"]
    work.mkdir(parents=True)
    made = recipes.RECIPES[case["recipe"]](work, ctx) if "recipe" in case else None
    inp = made or (HOSTILE / case["input"] if "input" in case else None)
    subs = {"input": str(inp), "tiny": str(ctx.tiny), "data": str(ctx.data), "out": str(work / "run"),
            "hostile": str(HOSTILE)}
    argv = _argv(case, subs)
    proc = run_cli(*argv, cwd=work, timeout=120)
    return SimpleNamespace(case=case, subs=subs, argv=argv, proc=proc, cwd=work, out=work / "run")


@pytest.fixture(scope="module")
def results(ctx):
    """Every case's CLI run, two processes at a time (the machine has two cores)."""
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        runs = list(pool.map(lambda c: _run_case(c, ctx), CASES))
    return {r.case["name"]: r for r in runs}


_RESUME_DRIVER = """
import contextlib, io, json, sys
from steadytune.cli import main
out = {}
for name, argv in json.load(sys.stdin).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except BaseException as e:  # what the CLI let escape: a crash
            rc = f"crash: {type(e).__name__}: {e}"
    out[name] = [rc, err.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def resume_results(results, ctx):
    """`train --resume --out RUN` on the run folder each failing train left behind. Run through
    cli.main in one subprocess (each would cost a second of start-up otherwise)."""
    todo = {name: ["train", "--out", str(r.out), "--resume", "--data", str(ctx.data), "--model", str(ctx.tiny)]
            for name, r in results.items() if r.argv[0] == "train" and r.case.get("resume", True)}
    proc = subprocess.run([sys.executable, "-c", _RESUME_DRIVER], input=json.dumps(todo), text=True,
                          capture_output=True, env=cli_env(), cwd=ctx.root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _error_line(stderr: str) -> str:
    """The CLI's message: the last line, which must be the only `error:` line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, stderr[-3000:]
    return lines[-1]


def _params(cases):
    return [pytest.param(c["name"], marks=pytest.mark.xfail(reason=c["xfail"], strict=True))
            if c.get("xfail") else c["name"] for c in cases]


@pytest.mark.parametrize("name", _params(CASES))
def test_hostile_input_gives_one_line_error_naming_the_file_and_the_fix(results, name):
    r = results[name]
    assert r.proc.returncode == 2, (r.argv, r.proc.returncode, r.proc.stderr[-3000:], r.proc.stdout[-2000:])
    line = _error_line(r.proc.stderr)
    assert len(line) < 1000, f"an error of {len(line)} characters echoes the input"
    for want in r.case["expect"]:
        assert _fill(want, r.subs) in line, (want, line)
    named = _fill(r.case.get("names", "{input}"), r.subs)
    assert named in line, (named, line)
    assert not (r.cwd / recipes.MARKER).exists(), "code from the hostile input ran"
    if r.argv[0] == "train" and r.case.get("resume", True):
        assert not (r.out / "checkpoints").exists() and not (r.out / "adapters").exists()


@pytest.mark.parametrize("name", [c["name"] for c in CASES
                                  if c.get("cmd", "train") == "train" and c.get("resume", True)])
def test_resume_on_the_folder_a_failed_train_left_fails_cleanly(resume_results, name):
    rc, stderr = resume_results[name]
    assert rc == 2, (rc, stderr)
    line = _error_line(stderr)
    assert "no complete checkpoint to resume from" in line and "start a new run without --resume" in line


def test_failed_resume_and_refused_overwrite_lose_nothing(results):
    """The damaged checkpoint is reported, not deleted; a finished run is not overwritten."""
    r = results["resume-corrupt-checkpoint"]
    ck = Path(r.subs["input"]) / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in ck.iterdir()) == ["COMPLETE", "adapters.safetensors",
                                                    "optimizer.safetensors", "state.json"]
    assert (ck / "state.json").read_text() == '{"step": 2, "epo'
    r = results["train-over-finished-run"]
    run = Path(r.subs["input"])
    assert sorted(p.name for p in run.rglob("*")) == ["adapter_config.json", "adapters"]
    assert (run / "adapters" / "adapter_config.json").read_text() == "{}"


# --------------------------------------------------------------------------- loading policy

def test_weights_load_only_from_safetensors_or_gguf_and_remote_code_is_never_trusted():
    """No call in the package passes trust_remote_code=True or reads pickles (torch.load, pickle)."""
    sources = {p: p.read_text() for p in (ROOT / "steadytune").rglob("*.py")}
    for path, text in sources.items():
        squeezed = text.replace(" ", "")
        assert "trust_remote_code=True" not in squeezed, path
        assert "torch.load" not in text and "import pickle" not in text, path
    assert '"trust_remote_code":False' in sources[ROOT / "steadytune" / "model.py"].replace(" ", "")


def test_auto_map_in_config_is_ignored_and_its_code_never_runs(tiny_model, tmp_path, monkeypatch):
    """A config.json that points AutoConfig/AutoModel at .py files of the folder loads with the
    built-in llama class; the files are never imported."""
    from steadytune.config import ModelConfig
    from steadytune.model import load_base

    folder = build_model(tmp_path / "automap")
    for mod in ("configuration_evil", "modeling_evil"):
        (folder / f"{mod}.py").write_text(f"open({recipes.MARKER!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    loaded = load_base(ModelConfig(path=str(folder), quantize="none"))
    assert type(loaded.model).__module__ == "mlx_lm.models.llama"
    assert loaded.tokenizer.encode("hello world") == loaded.tokenizer.encode("hello world") != []
    assert not (tmp_path / recipes.MARKER).exists()


def test_malicious_chat_template_is_a_user_error_not_executed(tiny_model, tmp_path):
    """transformers renders chat templates in Jinja's ImmutableSandboxedEnvironment: reaching
    ''.__class__ raises SecurityError, which steadytune reports as a UserError naming the record."""
    from steadytune.config import ModelConfig
    from steadytune.data import Example, render_chat, tokenize
    from steadytune.model import load_base

    folder = recipes.RECIPES["model-malicious-template"](tmp_path, SimpleNamespace(tiny=tiny_model))
    tok = load_base(ModelConfig(path=str(folder), quantize="none")).tokenizer
    ex = Example("train.jsonl:7", "chat", messages=recipes.GOOD["messages"])
    with pytest.raises(UserError) as e:
        tokenize(ex, tok)
    msg = str(e.value)
    assert msg.startswith("train.jsonl:7: the chat template of ") and "SecurityError" in msg
    assert "__subclasses__" not in msg and "<class" not in msg  # nothing was rendered
    with pytest.raises(UserError, match=r"^--prompt: .*SecurityError"):
        render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True, where="--prompt")


# --------------------------------------------------------------------------- out of memory / disk

@pytest.fixture
def small_run(tiny_model, tmp_path):
    """A config of 4 steps (8 examples, batch 2), a checkpoint after every step."""
    from steadytune.config import from_dict

    d = make_chat_data(tmp_path / "data", 8)
    return from_dict({"model": {"path": str(tiny_model), "quantize": "none"},
                      "data": {"path": str(d)},
                      "training": {"epochs": 1, "batch_size": 2, "pack": False, "save_every": 1,
                                   "eval_every": 0},  # not packed: 4 steps of 2 examples
                      "output": {"dir": str(tmp_path / "run"), "progress": "none", "keep_last": 5}})


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fail_at_step(monkeypatch, trainer, step: int, exc: BaseException):
    real = trainer.dispatch

    def step_fn(*a, **k):
        if trainer.state.step + 1 == step:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(trainer, "dispatch", step_fn)


def test_out_of_memory_mid_run_gives_planner_advice_and_keeps_the_last_checkpoint(small_run, monkeypatch):
    import steadytune
    from steadytune import checkpoint as ckpt
    from steadytune.trainer import Trainer

    trainer = Trainer(small_run)
    trainer.prepare()  # with the real planner: setup plans memory and reads the tokenizer with it
    fake_plan = SimpleNamespace(advice=lambda cfg: f"plan: use --batch-size {cfg.training.batch_size // 2} "
                                                   "--grad-accumulation 2")
    monkeypatch.setitem(sys.modules, "steadytune.plan", fake_plan)
    monkeypatch.setattr(steadytune, "plan", fake_plan, raising=False)
    _fail_at_step(monkeypatch, trainer, 3, RuntimeError("[malloc] Unable to allocate 68719476736 bytes."))
    with pytest.raises(UserError) as e:
        trainer.fit()
    run = Path(small_run.output.dir)
    last = run / "checkpoints" / "step-0000002"
    msg = str(e.value)
    assert msg.startswith("out of memory at step 3 ([malloc] Unable to allocate 68719476736 bytes.). ")
    assert "plan: use --batch-size 1 --grad-accumulation 2." in msg
    assert f"The last complete checkpoint, {last}, is intact: rerun with --resume --grad-checkpoint true" in msg
    assert [p.name for p in ckpt.list_checkpoints(run)[0]] == ["step-0000001", "step-0000002"]
    assert ckpt.list_checkpoints(run)[1] == [] and not (run / "adapters").exists()
    assert json.loads((last / "state.json").read_text())["step"] == 2


def test_out_of_memory_advice_comes_from_the_real_planner(small_run, monkeypatch):
    """steadytune.plan.advice(cfg): this tiny run is predicted to fit, so it says what it expected
    and the next step down."""
    from steadytune.trainer import Trainer

    trainer = Trainer(small_run)
    _fail_at_step(monkeypatch, trainer, 2, MemoryError())
    with pytest.raises(UserError) as e:
        trainer.fit()
    assert str(e.value).startswith("out of memory at step 2 (MemoryError). the planner expected ")
    assert "try --batch-size 1 --grad-accumulation 2 or --grad-checkpoint true." in str(e.value)


def test_other_runtime_errors_are_not_dressed_up_as_out_of_memory(small_run, monkeypatch):
    from steadytune.trainer import Trainer

    trainer = Trainer(small_run)
    _fail_at_step(monkeypatch, trainer, 2, RuntimeError("[matmul] shapes do not match"))
    with pytest.raises(RuntimeError, match=r"^\[matmul\] shapes do not match$"):
        trainer.fit()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_intact(small_run, monkeypatch):
    """The third checkpoint's optimizer file hits ENOSPC: a UserError naming the file; step 2's
    checkpoint is byte-for-byte what it was, and no half-written folder is left."""
    import errno

    from steadytune import checkpoint as ckpt
    from steadytune.trainer import Trainer

    run = Path(small_run.output.dir)
    real = ckpt._write_safetensors
    before = {}

    def write(path, arrays, metadata=None):
        if path.name == "optimizer.safetensors" and ".step-0000003" in str(path.parent):
            before.update(_snapshot(run / "checkpoints" / "step-0000002"))
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, arrays, metadata)

    monkeypatch.setattr(ckpt, "_write_safetensors", write)
    with pytest.raises(UserError) as e:
        Trainer(small_run).fit()
    msg = str(e.value)
    assert "optimizer.safetensors: could not write step-0000003 (No space left on device); the previous " \
           "copy is intact" in msg and "resume with --resume" in msg
    good, bad = ckpt.list_checkpoints(run)
    assert [p.name for p in good] == ["step-0000001", "step-0000002"] and bad == []
    assert _snapshot(run / "checkpoints" / "step-0000002") == before and before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


def test_disk_full_outside_a_checkpoint_is_a_user_error_too(small_run, monkeypatch):
    """ENOSPC from anything else in the loop (the metrics file, say) gets the same treatment."""
    import errno

    from steadytune.trainer import Trainer

    trainer = Trainer(small_run)
    _fail_at_step(monkeypatch, trainer, 4, OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl"))
    with pytest.raises(UserError) as e:
        trainer.fit()
    last = Path(small_run.output.dir) / "checkpoints" / "step-0000003"
    assert str(e.value) == ("metrics.jsonl: cannot write at step 4 (No space left on device); free disk "
                            f"space or fix permissions; the last complete checkpoint, {last}, is intact: "
                            "rerun with --resume")


# --------------------------------------------------------------------------- issue 23: run folders

def test_disk_full_inside_a_write_names_the_file_in_one_line(small_run, monkeypatch):
    """A full disk fails write() itself, with an OSError that names no file; the checkpoint is
    written on the writer's thread: the run still stops with the one-line error naming the file,
    and the previous checkpoints are kept."""
    import builtins
    import errno

    from steadytune import checkpoint as ckpt
    from steadytune.trainer import Trainer

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        return Full(f) if str(path).endswith("optimizer.safetensors") and ".step-0000003" in str(path) else f

    monkeypatch.setattr(ckpt, "open", open_, raising=False)  # the module's own name shadows the builtin
    with pytest.raises(UserError) as e:
        Trainer(small_run).fit()
    run = Path(small_run.output.dir)
    assert str(e.value).startswith(f"{run}/checkpoints/.step-0000003.tmp-{os.getpid()}/optimizer.safetensors: "
                                   "could not write step-0000003 (No space left on device); the previous copy is intact")
    assert [p.name for p in ckpt.list_checkpoints(run)[0]] == ["step-0000001", "step-0000002"]
    assert not (run / "adapters").exists()


def test_disk_full_at_the_final_adapters_without_a_checkpoint_saves_them_elsewhere(small_run, monkeypatch, tmp_path):
    """No checkpoint yet (save_every 0, epoch end is the run's end) and the final adapters cannot
    be written: they go to the temporary directory and the one-line error says where."""
    import builtins
    import errno
    import tempfile

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from steadytune import checkpoint as ckpt
    from steadytune.trainer import Trainer

    small_run.training.save_every = 0
    small_run.training.max_steps = 3  # stops before the epoch end: no checkpoint at all
    run = Path(small_run.output.dir)

    def open_(path, mode="r", *a, **k):
        if str(run) in str(path) and str(path).endswith(".safetensors") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(ckpt, "open", open_, raising=False)  # the module's own name shadows the builtin
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spare"))
    (tmp_path / "spare").mkdir()
    trainer = Trainer(small_run)
    with pytest.raises(UserError) as e:
        trainer.fit()
    spare = tmp_path / "spare" / f"steadytune-adapters-run-{os.getpid()}"
    assert str(e.value) == (f"{run / 'adapters'}: could not write the final adapters (No space left on device); "
                            f"they were saved to {spare} instead: move that folder to {run / 'adapters'} once "
                            "there is space")
    assert not (run / "checkpoints").exists() and not (run / "adapters").exists()
    got = {k: np.array(v) for k, v in mx.load(str(spare / "adapters.safetensors")).items()}
    want = {k: np.array(v) for k, v in tree_flatten(trainer.run.model.trainable_parameters())}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)  # the trained ones


_HOLD = """
import sys
from steadytune import runlock
runlock.claim(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_process_on_a_run_folder_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    from steadytune import runlock

    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=cli_env(), text=True)
    try:
        assert p.stdout.readline() == "locked\n"
        for attempt in (runlock.claim, runlock.check_new):
            with pytest.raises(UserError) as e:
                attempt(run)
            assert str(e.value) == (f"{run}: another steadytune process (pid {p.pid}) is using this run folder; "
                                    "wait for it to finish, or pass another --out")
    finally:
        p.kill()  # SIGKILL: the lock file stays, with a dead pid in it
        p.wait()
    runlock.claim(run)  # taken over
    assert (run / runlock.LOCK).read_text() == f"{os.getpid()}\n"
    runlock.release(run)


def test_training_into_the_folder_of_its_own_config_keeps_the_users_files(tiny_model, tmp_path, capsys):
    """`train myexp/config.yaml --out myexp`: the user's config.yaml (comments and all) and an
    old metrics.jsonl of an attempt without checkpoints are kept; the resolved config goes to
    steadytune-config.yaml, and the new metrics start empty."""
    from steadytune.generation import run_model_config
    from steadytune.trainer import Trainer, as_config

    exp = tmp_path / "myexp"
    exp.mkdir()
    d = make_chat_data(tmp_path / "data", 8)
    user = (f"# my experiment\nmodel:\n  path: {tiny_model}  # the tiny one\n  quantize: none\n"
            f"data:\n  path: {d}\ntraining:\n  max_steps: 2\n  batch_size: 2\n  eval_every: 0\n"
            f"output:\n  dir: {exp}\n  progress: none\n")
    (exp / "config.yaml").write_text(user)
    (exp / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 9.0}\n')
    Trainer(as_config(exp / "config.yaml")).fit()
    assert (exp / "config.yaml").read_text() == user
    assert (exp / "metrics-1.jsonl").read_text() == '{"event": "train", "step": 1, "loss": 9.0}\n'
    assert "renamed metrics-1.jsonl" in capsys.readouterr().out
    recs = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "train"] == [2]  # log_every 10: the last step only
    resolved = yaml.safe_load((exp / "steadytune-config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 2 and resolved["model"]["quantize"] == "none"
    assert run_model_config(exp).path == str(tiny_model)
