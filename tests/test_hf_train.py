"""`wmtp train model.pretrained=...` end to end on tiny Hugging Face models built here (nothing is downloaded)."""
import json, os, random, socket, subprocess, sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import logged_training_metrics, assert_same_training_metrics, kill_once_written

pytest.importorskip("transformers")

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
COMMON = ["--quick", "tracking.enabled=false", "max_steps=8", "save_interval=4"]


def _wmtp(*args, check=True, timeout=600, nproc=1, cwd=None):
    launch = [sys.executable, "-m", "wmtp.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), "-m", "wmtp.cli"]
    cmd = [*launch, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)
    if check: assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from wmtp.hf import tiny_model
    d = tmp_path_factory.mktemp("hf")
    return {"llama": tiny_model(d / "llama", "llama"), "gpt2": tiny_model(d / "gpt2", "gpt2"),
            "other_vocab": tiny_model(d / "other", "qwen2", vocab_size=320)}


@pytest.fixture(scope="module")
def baseline(models, tmp_path_factory):
    "The shipped recipe's offline command (a tiny local model instead of the Hub's Qwen), with a learning rate for a random model."
    out = tmp_path_factory.mktemp("runs") / "baseline"
    res = _wmtp("train", "--recipe", "pretrained", "--out", out, f"model.pretrained={models['llama']}", "optim.lr=3e-3", *COMMON)
    assert "HF export" in res.stdout
    return out


def test_pretrained_run_exports_a_folder_transformers_loads(baseline):
    "RUN_DIR/hf: plain transformers gives head 0's logits; wmtp.hf.from_pretrained every head; `wmtp export --to` the same."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from wmtp.hf import from_pretrained
    from wmtp.run import load_run
    info = json.loads((baseline / "run.json").read_text())
    assert info["tokenizer"] == "hf" and info["steps"] == 8
    run = load_run(baseline).model
    x = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = run(x, logits="all").logits
        plain = AutoModelForCausalLM.from_pretrained(baseline / "hf").eval()(x).logits
        back = from_pretrained(baseline / "hf").eval()(x, logits="all").logits
    torch.testing.assert_close(plain, ours[:, :, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back, ours, rtol=0, atol=0)
    assert not torch.allclose(ours[:, :, 1], ours[:, :, 0], atol=1e-4)  # the heads trained apart
    assert AutoTokenizer.from_pretrained(baseline / "hf").encode("def f():") == AutoTokenizer.from_pretrained(info["recipe"]["model"]["pretrained"]).encode("def f():")
    res = _wmtp("export", baseline, "--to", baseline.parent / "exported")
    assert "exported" in res.stdout
    with torch.no_grad(): torch.testing.assert_close(from_pretrained(baseline.parent / "exported")(x, logits="all").logits, ours, rtol=0, atol=0)
    res = _wmtp("export", baseline, check=False)  # RUN_DIR/hf is there already
    assert res.returncode == 2 and "exists and is not an empty folder" in res.stderr


def test_fsdp2_shards_every_decoder_layer_and_every_head_layer(models):
    "`wmtp.distributed.shard_model` wraps each block it finds: the model's decoder layers and each extra head's layers."
    from wmtp.distributed import _blocks
    from wmtp.hf import from_pretrained
    m = from_pretrained(models["llama"], n_future=4, n_head_layers=2)
    blocks = _blocks(m)
    assert len(blocks) == 2 + 3 * 2 and all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)
    assert {id(b) for b in blocks} == {id(l) for l in m.lm.model.layers} | {id(l) for h in m.heads for l in h}


def test_eval_on_a_pretrained_run(baseline):
    res = _wmtp("eval", baseline, "--tasks", "builtin", "--max-problems", "1", "--max-new-tokens", "8", "--valid-batches", "1",
                "--repeats", "1", "--no-track")
    assert "| head 3 | t+4 |" in res.stdout and "outputs identical: yes" in res.stdout


@pytest.mark.parametrize("recipe,extra", [("critic", ["data.n_tasks=24"]), ("rho1_weighted", ["reference=MODEL"]),
                                          ("rho1_tokenskip", ["reference=RUN"]), ("baseline", ["model.train=heads", "model.tokenizer=TOKENIZER"])])
def test_every_algorithm_on_a_pretrained_model(models, baseline, tmp_path, recipe, extra):
    "critic (value head on the trunk), rho1 with a HF model or a wmtp run as reference, and heads-only training."
    # a GPT-2 as a Llama's reference, and a tokenizer named apart from the model: the same vocabulary
    extra = [e.replace("MODEL", str(models["gpt2"])).replace("RUN", str(baseline)).replace("TOKENIZER", str(models["gpt2"])) for e in extra]
    out = tmp_path / "run"
    res = _wmtp("train", "--recipe", recipe, "--out", out, f"model.pretrained={models['gpt2'] if recipe == 'critic' else models['llama']}",
                *COMMON, *extra)
    info = json.loads((out / "run.json").read_text())
    assert info["recipe"]["algorithm"] == recipe.replace("_", "-") and (out / "hf" / "mtp_heads.safetensors").is_file()
    assert all(v == v and v > 0 for v in info["final_val_loss_per_head"])
    if "model.train=heads" in extra:  # head 0 is still the pretrained model
        from transformers import AutoModelForCausalLM
        a, b = AutoModelForCausalLM.from_pretrained(models["llama"]), AutoModelForCausalLM.from_pretrained(out / "hf")
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_reference_with_another_vocabulary_is_an_error_and_writes_nothing(models, tmp_path):
    res = _wmtp("train", "--recipe", "rho1_weighted", "--out", tmp_path / "r", f"model.pretrained={models['llama']}",
                f"reference={models['other_vocab']}", *COMMON, check=False)
    assert res.returncode == 2 and "vocabulary of 320 tokens, the model 384" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_bad_pretrained_model_is_an_error_and_writes_nothing(models, tmp_path):
    for arg, msg in ((f"model.pretrained={tmp_path / 'missing'}", "no such model folder"),
                     (f"model.pretrained={tmp_path}", "is not a Hugging Face model"),
                     ("data.seq_len=512", "longer than the pretrained model's 256 positions")):
        res = _wmtp("train", "--out", tmp_path / "r", f"model.pretrained={models['llama']}", arg, *COMMON, check=False)
        assert res.returncode == 2 and msg in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "r").exists()


def test_resume_after_kill_9_equals_an_uninterrupted_run(models, tmp_path):
    "SIGKILL a pretrained run after a checkpoint, resume: the final weights equal a straight run's, bit for bit."
    common = [f"model.pretrained={models['llama']}", "--quick", "tracking.enabled=false", "max_steps=16", "save_interval=4"]
    _wmtp("train", "--out", tmp_path / "straight", *common)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "wmtp.cli", "train", "--out", str(out), *common, "--resume"]
    kill_once_written(cmd, out / "checkpoints" / "step-8", env=ENV, then=random.Random(0).uniform(0.0, 0.2))
    assert not (out / "model.safetensors").exists()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(str(tmp_path / "straight" / "hf" / "mtp_heads.safetensors")), load_file(str(out / "hf" / "mtp_heads.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_and_resume_with_one(models, tmp_path):
    """torchrun with 2 gloo processes: the same training loss, per-head CE and gradient norm at every step (logged to MLflow,
    rtol 1e-5), validation losses and weights as 1 process; its checkpoint resumes with 1."""
    args = [f"model.pretrained={models['llama']}", "--quick", "tracking.log_every=1", "max_steps=8", "save_interval=4"]
    _wmtp("train", "--out", tmp_path / "one", *args)
    _wmtp("train", "--out", tmp_path / "two", *args, nproc=2)
    i1, i2 = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert i2["world_size"] == 2
    one, two = logged_training_metrics(tmp_path / "one"), logged_training_metrics(tmp_path / "two")
    assert [s for s, _ in one["train_loss"]] == list(range(1, 9)) and {"train_ce_h0", "train_ce_h3"} <= set(one)
    worst = assert_same_training_metrics(one, two, rtol=1e-5)
    print(f"largest relative difference of the logged training metrics, 2 processes vs 1: {worst:.2e}")
    torch.testing.assert_close(torch.tensor(i2["final_val_loss_per_head"]), torch.tensor(i1["final_val_loss_per_head"]), rtol=1e-5, atol=0)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    res = _wmtp("train", "--out", tmp_path / "two", *[x for x in args if not x.startswith("max_steps")], "max_steps=12", "--resume")
    assert "resumed from" in res.stdout and json.loads((tmp_path / "two" / "run.json").read_text())["steps"] == 12
