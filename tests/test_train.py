"""`wmtp train` end to end, as a user runs it: real processes, real files, a real MLflow store."""
import json, os, random, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_once_written, wmtp_cli

QUICK = ["--quick", "tracking.log_every=5"]


def _train(out, *args, check=True, timeout=600):
    return wmtp_cli("train", "--out", out, *QUICK, *args, check=check, timeout=timeout, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def _train_losses(run_dir: Path) -> list[float]:
    from mlflow import MlflowClient
    info = json.loads((run_dir / "run.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    return [m.value for m in sorted(client.get_metric_history(info["run_id"], "train_loss"), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "baseline"
    res = _train(out)
    return out, res


def test_baseline_quick_run_produces_everything_and_learns(baseline_run):
    out, res = baseline_run
    for p in ("model.safetensors", "run.json", "mlflow.db", "plots/loss_per_head.png", "plots/weights.png"):
        assert (out / p).exists(), p
    assert any(p.name.startswith("step-") for p in (out / "checkpoints").iterdir())
    info = json.loads((out / "run.json").read_text())
    assert len(info["final_val_loss_per_head"]) == info["model_config"]["n_future"]
    assert "validation loss per head" in res.stdout and str(out) in res.stdout
    losses = _train_losses(out)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("recipe", ["rho1_weighted", "rho1_tokenskip", "critic"])
def test_every_algorithm_trains_and_lowers_the_loss(baseline_run, tmp_path, recipe):
    base, _ = baseline_run
    extra = [f"reference={base}"] if recipe.startswith("rho1") else []
    out = tmp_path / recipe
    res = _train(out, "--recipe", recipe, *extra)
    losses = _train_losses(out)
    assert losses[-1] < losses[0] - 0.1, (recipe, losses)
    info = json.loads((out / "run.json").read_text())
    assert info["recipe"]["algorithm"] == recipe.replace("_", "-")
    if recipe == "critic": assert "critic stage 1" in res.stdout


def test_rho1_without_reference_is_a_clear_error_and_writes_nothing(tmp_path):
    res = _train(tmp_path / "r", "--recipe", "rho1_weighted", check=False)
    assert res.returncode == 2 and "needs a reference model" in res.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_key_names_the_closest(tmp_path):
    res = _train(tmp_path / "r", "optim.learning_rate=0.1", check=False)
    assert res.returncode == 2 and "did you mean" in res.stderr and "optim.lr" in res.stderr


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL `wmtp train --resume` mid-run (after a chosen checkpoint, at a random moment after it), resume each time:
    the final weights equal a straight run's, bit for bit."""
    common = ["max_steps=30", "save_interval=5", "tracking.enabled=false"]
    _train(tmp_path / "straight", *common)
    out, rng = tmp_path / "killed", random.Random(0)
    cmd = [sys.executable, "-m", "wmtp.cli", "train", "--out", str(out), *QUICK, *common, "--resume"]
    for after_step in (10, 20):  # progress-based, so the kills land mid-run however fast this machine is
        # then a random moment: training, saving or rotating
        kill_once_written(cmd, out / "checkpoints" / f"step-{after_step}", then=rng.uniform(0.0, 0.3))
    assert not (out / "model.safetensors").exists()  # the killed runs never finished
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), "weights after kills and resumes differ from the uninterrupted run"


@pytest.mark.slow
def test_default_main_job_runs_to_the_end(tmp_path):
    """The README's main job, `wmtp train` with no arguments (in a fresh working directory)."""
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "wmtp.cli", "train"], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "wmtp-runs" / "default"
    info = json.loads((out / "run.json").read_text())
    print(f"default wmtp train: {time.time() - t0:.0f} s, final validation loss per head {info['final_val_loss_per_head']}")
    assert info["steps"] == 300 and (out / "model.safetensors").exists()
