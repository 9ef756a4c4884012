"""notebooks/finetune_chatbot.ipynb, executed by a real Jupyter kernel (nbclient) on a short run of
the default model: it finishes, shows progress and draws the plot; and an interrupt sent to the
kernel mid-training leaves a complete checkpoint that the next cell resumes from.

Parameters are overridden the way papermill does it: a cell inserted after the cell tagged
`parameters`. These are the slowest tests of the suite (a kernel, the 135M model, a few steps)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "finetune_chatbot.ipynb"
QUESTION = "Hi! What's your name?"


def load(run_dir: Path, **params) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    values = {"BATCH_SIZE": 2, "MAX_SEQ_LENGTH": 256, "EVAL_EVERY": 2, "SAVE_EVERY": 2, "MAX_NEW_TOKENS": 4,
              "QUESTIONS": [QUESTION], "RUN_DIR": str(run_dir), **params}
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def client(nb, cwd: Path):
    return nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(cwd)}})


def cell_index(nb, first_line: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith(first_line))


def text(cell, name: str) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def png_of(cell):
    from PIL import Image

    data = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(data) == 1, f"expected one image output, got {len(data)}"
    return Image.open(io.BytesIO(base64.b64decode(data[0]))).convert("RGB")


def test_notebook_runs_from_notebooks_folder_shows_progress_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    nb = load(run_dir, MAX_STEPS=4)
    client(nb, ROOT / "notebooks").execute()

    train = nb.cells[cell_index(nb, "result = None")]
    bar = text(train, "stderr")
    assert "4/4" in bar and "loss=" in bar and "tok/s=" in bar  # the progress bar reached the end
    assert "100%" in bar
    resume = nb.cells[cell_index(nb, "if result is None")]
    assert text(resume, "stdout").startswith("4 steps (max_steps)")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["event"] == "val"] == [2, 4]
    answers = text(nb.cells[cell_index(nb, "tuned = load_tuned")], "stdout")
    assert answers.startswith(f"Q: {QUESTION}\nbefore: ") and "\nafter:  " in answers

    img = png_of(nb.cells[cell_index(nb, "fig = result.plot")])
    w, h = img.size  # 11 x 7.5 inches at 100 dpi, trimmed or padded a little by bbox_inches="tight"
    assert 1000 <= w <= 1200 and 680 <= h <= 820, img.size
    colors = img.getcolors(1 << 20)
    assert len(colors) > 50  # axes, text and four panels of curves, not a blank canvas
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    assert (run_dir / "adapters" / "adapters.safetensors").is_file()


def test_kernel_interrupt_leaves_checkpoint_and_next_cell_resumes(tmp_path):
    run_dir = tmp_path / "run"
    nb = load(run_dir, MAX_STEPS=5, EVAL_EVERY=0)  # validation only at the end
    train, resume = cell_index(nb, "result = None"), cell_index(nb, "if result is None")
    # The model load / before-answers cell and everything after validation are covered above.
    skip = {cell_index(nb, "def ask("), cell_index(nb, "tuned = load_tuned"), cell_index(nb, "fig = result.plot")}
    nbc = client(nb, ROOT)
    interrupted_at, last, saved = asyncio.run(_run_with_interrupt(nbc, nb, train, resume, skip, run_dir))

    err = nb.cells[train].outputs[-1]
    assert err.output_type == "error" and err.ename == "TrainingInterrupted", err
    assert interrupted_at <= saved < 5  # saved at the step the signal arrived in, not at the end
    out = text(nb.cells[resume], "stdout")
    assert f"resuming from {last} (step {saved}" in out
    assert "5 steps (max_steps)" in out
    train_steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x)["event"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5]  # each step logged once across the two cells


async def _run_with_interrupt(nbc, nb, train: int, resume: int, skip: set, run_dir: Path) -> int:
    """Run cells in order; during the training cell, interrupt the kernel once a step is logged.
    Returns the step logged when the interrupt was sent, and the newest complete checkpoint right
    after the interrupt with its step (later checkpoints may prune it)."""
    async with nbc.async_setup_kernel():
        for i, cell in enumerate(nb.cells[:resume + 2]):  # through the validation cell
            if cell.cell_type != "code" or i in skip:
                continue
            if i != train:
                await nbc.async_execute_cell(cell, i)
                continue
            task = asyncio.ensure_future(nbc.async_execute_cell(cell, i))
            step = await _first_logged_step(run_dir / "metrics.jsonl", task)
            await nbc.km.interrupt_kernel()
            with pytest.raises(nbclient.exceptions.CellExecutionError):
                await task
            complete = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())
            assert complete, "no complete checkpoint after the interrupt"
            saved = json.loads((complete[-1] / "state.json").read_text())["step"]
    return step, complete[-1], saved


async def _first_logged_step(metrics: Path, task, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert not task.done(), "the training cell ended before it could be interrupted"
        if metrics.is_file():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.endswith("}")]
            if steps:
                return steps[-1]
        await asyncio.sleep(0.05)
    raise AssertionError("no training step was logged in time")
