"""`wmtp train model.pretrained=... model.heads=mlp|sequential` end to end on a tiny local Llama, then `wmtp eval` and the export."""
import json, os, subprocess, sys

import pytest
import torch

from conftest import kill_once_written, wmtp_cli

pytest.importorskip("transformers")

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}


def _wmtp(*args): return wmtp_cli(*args, check=True, env=ENV)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from wmtp.hf import tiny_model
    return tiny_model(tmp_path_factory.mktemp("hf") / "llama", "llama")


@pytest.mark.parametrize("heads", ["mlp", "sequential"])
def test_pretrained_run_with_a_head_layout(llama, tmp_path, heads):
    "Train a few steps, then: run.json and the export record the layout, plain transformers gives head 0, every head comes back, eval decodes identically."
    from transformers import AutoModelForCausalLM
    from wmtp.hf import MTP_CONFIG, from_pretrained
    from wmtp.run import load_run
    out = tmp_path / heads
    res = _wmtp("train", "--recipe", "pretrained", "--out", out, f"model.pretrained={llama}", f"model.heads={heads}", "optim.lr=3e-3",
                "--quick", "tracking.enabled=false", "max_steps=6", "save_interval=3")
    assert "HF export" in res.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["model_config"]["heads"] == heads and json.loads((out / "hf" / MTP_CONFIG).read_text())["heads"] == heads
    run = load_run(out).model
    assert run.cfg.heads == heads
    x = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = run(x, logits="all").logits
        plain = AutoModelForCausalLM.from_pretrained(out / "hf").eval()(x).logits
        back = from_pretrained(out / "hf")
        assert back.cfg.heads == heads
        torch.testing.assert_close(plain, ours[:, :, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(back(x, logits="all").logits, ours, rtol=0, atol=0)
    assert not torch.allclose(ours[:, :, 1], ours[:, :, 0], atol=1e-4)  # the extra heads trained apart from head 0
    res = _wmtp("eval", out, "--k", "1", "--max-problems", "1", "--max-new-tokens", "16", "--valid-batches", "1", "--repeats", "1",
                "--tasks", "builtin", "--no-track")
    assert "outputs identical: yes" in res.stdout and "| head 1 | t+2 |" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["mlp", "sequential"])
def test_fsdp2_two_processes_equal_one(llama, tmp_path, heads):
    "torchrun with 2 gloo processes trains the layout as 1 process does: validation losses (rtol 1e-5) and weights."
    from conftest import free_port
    from safetensors.torch import load_file
    args = ["train", f"model.pretrained={llama}", f"model.heads={heads}", "--quick", "tracking.enabled=false", "max_steps=4", "save_interval=4"]
    _wmtp(*args, "--out", tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "wmtp.cli", *args, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    i1, i2 = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert i2["world_size"] == 2
    torch.testing.assert_close(torch.tensor(i2["final_val_loss_per_head"]), torch.tensor(i1["final_val_loss_per_head"]), rtol=1e-5, atol=0)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sequential_resume_after_kill_9_equals_an_uninterrupted_run(llama, tmp_path):
    "SIGKILL a sequential-heads run after a checkpoint, resume: final weights and extra heads equal a straight run's, bit for bit."
    from safetensors.torch import load_file
    common = [f"model.pretrained={llama}", "model.heads=sequential", "--quick", "tracking.enabled=false", "max_steps=12", "save_interval=4"]
    _wmtp("train", "--out", tmp_path / "straight", *common)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "wmtp.cli", "train", "--out", str(out), *common, "--resume"]
    kill_once_written(cmd, out / "checkpoints" / "step-4", env=ENV)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    for f in ("model.safetensors", "hf/mtp_heads.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / f)), load_file(str(out / f))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f
