"""`wmtp eval` end to end, as a user starts it: a real run directory, a real MLflow store, a subprocess."""
import json, os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from wmtp.checkpoint import export_safetensors
from wmtp.model import MTPConfig, MTPTransformer
from conftest import wmtp_cli

# one thread: the models are tiny, and two threads competing with other processes for the cores are far slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
FAST = ["--k", "1", "--max-problems", "2", "--max-new-tokens", "16", "--valid-batches", "1", "--repeats", "1"]


def _wmtp(*args, timeout=300): return wmtp_cli(*args, timeout=timeout, env=ENV, script=True)


def _run_dir(d: Path, steps=7, tracked=True) -> Path:
    "A finished run as wmtp.train lays it out: weights, run.json and (when tracked) an MLflow run with a training metric."
    torch.manual_seed(0)
    model = MTPTransformer(MTPConfig(vocab_size=264, d_model=32, n_layer=1, n_head=2, n_future=2, max_seq_len=64))
    d.mkdir(parents=True)
    export_safetensors(model, d / "model.safetensors")
    run_id = uri = None
    if tracked:
        from wmtp.track import Tracker
        with Tracker(d, run_name="train") as tr:
            tr.log_metrics({"train_loss": 5.5}, step=steps)
        run_id, uri = tr.run_id, tr.tracking_uri
    info = {"model_config": asdict(model.cfg), "config": {}, "recipe": {"data": {"seq_len": 64}}, "tokenizer": "byte",
            "final_val_loss_per_head": [5.6, 5.6], "steps": steps, "run_id": run_id, "tracking_uri": uri, "wall_time_s": 1.0}
    (d / "run.json").write_text(json.dumps(info))
    return d


def test_eval_prints_the_table_and_logs_to_the_training_run(tmp_path):
    run = _run_dir(tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    out = _wmtp("eval", str(run), *FAST, "--json", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    for line in (f"## wmtp eval: {run} (step 7)", "| head 0 | t+1 |", "| head 1 | t+2 |", "| greedy |", "| self-speculative |",
                 "outputs identical: yes", "| pass@1 |", f"run {info['run_id']}"):
        assert line in out.stdout, (line, out.stdout)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["speculative"]["identical"] and res["speculative"]["tokens_per_forward"] >= 1.0
    assert res["pass_at_k"]["problems"] == 2 and res["pass_at_k"]["tasks"] in ("humaneval", "builtin")

    from mlflow import MlflowClient
    client = MlflowClient(info["tracking_uri"])
    r = client.get_run(info["run_id"])  # the training run itself, not a new one
    assert r.info.status == "FINISHED"
    m = r.data.metrics
    assert m["train_loss"] == 5.5  # what training logged is still there
    assert m["eval/spec_identical"] == 1.0
    assert m["eval/val_loss_h1"] == pytest.approx(res["per_head"]["loss"][1], rel=1e-9)
    assert m["eval/pass_at_1"] == res["pass_at_k"]["pass_at_k"]["1"]
    assert {f"eval/val_{s}_h{k}" for s in ("loss", "ppl", "acc") for k in range(2)} <= set(m)
    assert [h.step for h in client.get_metric_history(info["run_id"], "eval/val_loss_h0")] == [7]
    assert len(client.search_runs([r.info.experiment_id])) == 1


def test_eval_without_tracking_writes_no_store(tmp_path):
    run = _run_dir(tmp_path / "run", tracked=False)
    out = _wmtp("eval", str(run / "model.safetensors"), *FAST, "--tasks", "builtin", "--no-track")
    assert out.returncode == 0, out.stderr
    assert "| pass@k (builtin: 2 problems, 1 samples each, T=0, 16 new tokens, 0 reference solutions fit) | value |" in out.stdout
    assert "logged to MLflow" not in out.stdout and not (run / "mlflow.db").exists()


def test_bad_paths_are_errors_that_name_the_path(tmp_path):
    missing = tmp_path / "no-such-run"
    out = _wmtp("eval", str(missing))
    assert out.returncode == 2 and f"wmtp eval: error: no run directory, model file or checkpoint at {missing}" in out.stderr
    (tmp_path / "not-a-run").mkdir()
    out = _wmtp("eval", str(tmp_path / "not-a-run"))
    assert out.returncode == 2 and f"{tmp_path / 'not-a-run' / 'run.json'} not found" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_eval_after_wmtp_train_quick(tmp_path):
    train = _wmtp("train", "--quick", "--out", str(tmp_path / "run"), timeout=600)
    assert train.returncode == 0, train.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    ckpt = tmp_path / "run" / "checkpoints" / f"step-{info['steps']}"
    out = _wmtp("eval", str(ckpt), *FAST)
    assert out.returncode == 0, out.stderr
    assert f"(step {info['steps']})" in out.stdout and "outputs identical: yes" in out.stdout
    from mlflow import MlflowClient
    m = MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).data.metrics
    assert "train_loss" in m and "eval/val_loss_h0" in m
