"""Reliability of run, export and dataset directories: no data loss, atomic creation, clean
one-line errors, two-stage checkpoints and resume."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from helpers import TINY
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import load_config
from alignprog.training import RunDir, RunError
from alignprog.training.checkpoint import STATE_FILE, load_checkpoint
from alignprog.training.loop import fit
from alignprog.training.rundir import MARKER_FILE, claim_run_name

runner = CliRunner()
SETS = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TINY.items()), [])


def tiny(**extra):
    return load_config(overrides=TINY | extra)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def train(tmp_path: Path, name: str, *extra):
    return invoke("train", "--runs-dir", tmp_path, "--name", name, "--steps", "2", *SETS, *extra)


# -- 1. --overwrite keeps the old run when the new one cannot start -------------------------


def test_overwrite_with_a_bad_dataset_keeps_the_old_run(tmp_path: Path):
    assert train(tmp_path, "r").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert before
    result = train(tmp_path, "r", "--overwrite", "--dataset", tmp_path / "typo")
    assert result.exit_code != 0
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path: Path,
                                                                         monkeypatch):
    from alignprog.training import loop

    assert train(tmp_path, "r").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())

    def no_memory(self, *args, **kwargs):   # the model cannot be built after the old run moved
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(loop.Trainer, "__init__", no_memory)
        result = train(tmp_path, "r", "--overwrite")
    assert result.exit_code == 1 and "out of memory" in result.output
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]          # nothing hidden left over
    assert train(tmp_path, "r", "--overwrite", "--steps", "1").exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) != before


def test_a_failed_start_leaves_no_stale_run(tmp_path: Path):
    result = train(tmp_path, "r", "--set", "data.multi_task=false")
    assert result.exit_code != 0 and "multi_task" in result.output
    assert not (tmp_path / "r").exists()
    assert train(tmp_path, "r").exit_code == 0     # the next try is not blocked


def test_a_bad_dataset_leaves_no_run(tmp_path: Path):
    result = train(tmp_path, "r", "--dataset", tmp_path / "typo")
    assert result.exit_code != 0
    assert not (tmp_path / "r").exists()


# -- 2. --overwrite deletes only what alignprog wrote ----------------------------------------


def test_overwrite_refuses_a_folder_holding_config_yaml(tmp_path: Path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("mine: 1\n")
    (tmp_path / "r" / "checkpoints").mkdir()
    result = train(tmp_path, "r", "--overwrite")
    assert result.exit_code != 0
    assert "not written by alignprog" in result.output and MARKER_FILE in result.output
    assert (tmp_path / "r" / "config.yaml").read_text() == "mine: 1\n"


def test_overwrite_accepts_an_old_run_with_its_meta_format(tmp_path: Path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "meta.json").write_text(json.dumps({"format": "alignprog-run"}))
    run = RunDir.create(tmp_path, "r", overwrite=True)
    assert (run.path / MARKER_FILE).is_file() and not (run.path / "meta.json").exists()


def test_export_refuses_a_hugging_face_folder(tmp_path: Path):
    assert train(tmp_path, "r").exit_code == 0
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"not ours")
    (hf / "config.json").write_text("{}")
    result = invoke("export", tmp_path / "r", "--out", hf, "--overwrite")
    assert result.exit_code != 0 and "not written by alignprog" in result.output
    assert (hf / "model.safetensors").read_bytes() == b"not ours"
    # an alignprog export is replaced
    out = tmp_path / "exp"
    assert invoke("export", tmp_path / "r", "--out", out).exit_code == 0
    assert (out / ".alignprog-export").is_file()
    assert invoke("export", tmp_path / "r", "--out", out, "--overwrite").exit_code == 0


def test_data_synth_overwrite_refuses_foreign_folders_and_files(tmp_path: Path):
    small = ["--tasks", "2", "--videos-per-task", "2", "--dim", "4"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    result = invoke("data", "synth", foreign, *small, "--overwrite")
    assert result.exit_code != 0 and "not written by alignprog" in result.output
    assert (foreign / "thesis.tex").is_file()
    plain = tmp_path / "plain.txt"
    plain.write_text("keep")
    result = invoke("data", "synth", plain, *small, "--overwrite")
    assert result.exit_code != 0 and plain.read_text() == "keep"
    ours = tmp_path / "ours"
    assert invoke("data", "synth", ours, *small).exit_code == 0
    assert (ours / ".alignprog-dataset").is_file()
    assert invoke("data", "synth", ours, *small, "--overwrite").exit_code == 0


# -- 3. atomic creation ----------------------------------------------------------------------


def _race_create(root, barrier, queue):
    barrier.wait()
    try:
        RunDir.create(Path(root), "same")
        queue.put("ok")
    except RunError as exc:
        queue.put(f"error: {exc}")


def _race_claim(root, barrier, queue):
    from datetime import datetime
    barrier.wait()
    queue.put(claim_run_name("lav", Path(root), now=datetime(2026, 1, 1)))


@pytest.mark.parametrize("target", [_race_create, _race_claim])
def test_two_processes_racing_for_a_run_dir(tmp_path: Path, target):
    ctx = mp.get_context("fork")
    for i in range(10):
        root = tmp_path / str(i)
        barrier, queue = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=target, args=(str(root), barrier, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        answers = sorted(queue.get(timeout=5) for _ in procs)
        if target is _race_create:
            assert answers[0].startswith("error") and answers[1] == "ok", answers
        else:
            assert len(set(answers)) == 2, answers


# -- 4. two-stage checkpoints and resume -----------------------------------------------------


TWO = {"train.epochs": 1, "train.two_stage": True, "train.head_epochs": 2}


def test_two_stage_latest_checkpoint_is_the_trained_head(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    res = fit(tiny(**TWO), run=run)
    from helpers import tiny_model  # noqa: F401  (same widths)
    state = load_checkpoint(run.latest_checkpoint(), restore_rng=False)
    assert state["stage"] == 2
    from alignprog.training.restore import load_trained_model
    _, model, _ = load_trained_model(run.latest_checkpoint())
    for (k, a), b in zip(res.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a.cpu(), b), k
    # best (what eval-progress and export take by default) is a stage-2 checkpoint too: the
    # final encoder with a trained head, never stage 1's encoder with an untrained head
    best = load_checkpoint(run.best_checkpoint(), restore_rng=False)
    assert best["stage"] == 2
    _, model, _ = load_trained_model(run.best_checkpoint())
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(res.model.state_dict()[k].cpu(), v), k


def test_two_stage_interrupted_in_stage_2_resumes_bit_identically(tmp_path: Path):
    full = fit(tiny(**TWO), run=RunDir.create(tmp_path, "full"))
    seen = []

    def stop_in_stage_2(kind, record):
        if record.get("stage") == "head" and kind == "step":
            seen.append(record["step"])
            if len(seen) == 2:
                raise KeyboardInterrupt

    part = fit(tiny(**TWO), run=RunDir.create(tmp_path, "part"), callback=stop_in_stage_2)
    assert part.interrupted
    resumed = fit(tiny(**TWO), run=RunDir.create(tmp_path, "part", resume=True), resume=True)
    assert not resumed.interrupted and resumed.step == full.step
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_every(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    fit(tiny(**{"train.steps": 4, "train.checkpoint_every": 1}), run=run)
    assert [s for s, _ in run.checkpoints()] == [1, 2, 3, 4]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from alignprog.training.restore import load_trained_model
    return load_trained_model(path)[1].state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_checkpoint_every_carries_across_a_resume(tmp_path: Path):
    extra = {"train.steps": 7, "train.checkpoint_every": 2}
    full = RunDir.create(tmp_path, "full")
    fit(tiny(**extra), run=full)

    def stop_at_3(kind, record):
        if kind == "step" and record["step"] == 3:
            raise KeyboardInterrupt

    part = RunDir.create(tmp_path, "part")
    assert fit(tiny(**extra), run=part, callback=stop_at_3).interrupted
    assert [s for s, _ in part.checkpoints()] == [2, 3]          # 3: the interrupt's save
    resumed = RunDir.create(tmp_path, "part", resume=True)
    fit(tiny(**extra), run=resumed, resume=True)
    # the interval counts optimizer steps, not steps since the resume
    assert [s for s, _ in resumed.checkpoints()] == [2, 3, 4, 6, 7]
    assert [s for s, _ in full.checkpoints()] == [2, 4, 6, 7]
    assert_same_weights(full.latest_checkpoint(), resumed.latest_checkpoint())


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGTERM"), reason="no SIGTERM here")
def test_sigterm_mid_run_saves_a_checkpoint_that_resumes_to_the_same_weights(tmp_path: Path):
    import signal
    import subprocess
    import sys

    args = ["train", "--runs-dir", str(tmp_path), "--steps", "40", *SETS]
    proc = subprocess.Popen([sys.executable, "-m", "alignprog", *args, "--name", "part",
                             "--json-logs"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:                    # wait until training is under way
            record = json.loads(line)
            if record["kind"] == "step" and record["step"] >= 2:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    run = RunDir.open(tmp_path / "part")
    stopped = run.latest_checkpoint()
    assert stopped is not None and 2 <= run.checkpoints()[-1][0] < 40
    assert invoke(*args, "--name", "part", "--resume").exit_code == 0
    assert invoke(*args, "--name", "full").exit_code == 0
    assert_same_weights(RunDir.open(tmp_path / "full").latest_checkpoint(),
                        RunDir.open(tmp_path / "part").latest_checkpoint())


def test_sigterm_handler_is_restored():
    import signal
    before = signal.getsignal(signal.SIGTERM)
    fit(tiny(**{"train.steps": 1}))
    assert signal.getsignal(signal.SIGTERM) is before


# -- 6. clean one-line errors ----------------------------------------------------------------


def test_runs_dir_that_is_a_file(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    result = invoke("train", "--runs-dir", tmp_path / "f", "--name", "r", "--steps", "1", *SETS)
    assert result.exit_code != 0 and "not a directory" in result.output
    assert (tmp_path / "f").read_text() == "x"


def test_a_300_character_name(tmp_path: Path):
    result = train(tmp_path, "a" * 300)
    assert result.exit_code != 0 and "too long" in result.output


@pytest.mark.parametrize("damage", ["missing", "wrong_type", "not_json"])
def test_resume_from_a_damaged_state(tmp_path: Path, damage):
    assert train(tmp_path, "r").exit_code == 0
    ckpt = RunDir.open(tmp_path / "r").latest_checkpoint()
    saved = json.loads((ckpt / STATE_FILE).read_text())
    if damage == "missing":
        del saved["state"]["batch_in_epoch"]
        text = json.dumps(saved)
    elif damage == "wrong_type":
        saved["state"]["step"] = "three"
        text = json.dumps(saved)
    else:
        text = "{not json"
    (ckpt / STATE_FILE).write_text(text)
    result = invoke("train", "--runs-dir", tmp_path, "--name", "r", "--resume", "--steps", "4")
    assert result.exit_code != 0 and str(ckpt.name) in result.output
    assert len(result.output.strip().splitlines()) <= 3


@pytest.mark.parametrize("damage", ["model", "meta"])
def test_export_of_a_damaged_checkpoint(tmp_path: Path, damage):
    assert train(tmp_path, "r").exit_code == 0
    ckpt = RunDir.open(tmp_path / "r").latest_checkpoint()
    if damage == "model":
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    else:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["meta"]["config"] = {"train": {"lr": "fast"}}
        (ckpt / "meta.json").write_text(json.dumps(meta))
    result = invoke("export", tmp_path / "r", "--checkpoint", "last", "--out", tmp_path / "x")
    assert result.exit_code != 0 and "error" in result.output
    assert not (tmp_path / "x").exists()


def test_overwrite_with_a_config_error_keeps_the_old_run(tmp_path: Path):
    assert train(tmp_path, "r").exit_code == 0
    before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    result = train(tmp_path, "r", "--overwrite", "--set", "data.multi_task=false")
    assert result.exit_code != 0
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == before


def test_discard_if_unstarted_removes_only_our_new_runs(tmp_path: Path):
    run = RunDir.create(tmp_path, "new")
    assert run.discard_if_unstarted() and not run.path.exists()
    (tmp_path / "old").mkdir()                       # an empty folder that was already there
    old = RunDir.open(tmp_path / "old")
    assert not old.discard_if_unstarted() and old.path.exists()
    run = RunDir.create(tmp_path, "trained")
    fit(tiny(**{"train.steps": 1}), run=run)
    assert not run.discard_if_unstarted() and run.latest_checkpoint() is not None
