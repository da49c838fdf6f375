"""wmtp.distributed with real processes (gloo on CPU, world size 2): equal losses, resharding both ways, a dead rank.

Each run is tests/_dist_worker.py, started alone or under `python -m torch.distributed.run`.
Tolerances: fp32 on CPU; a 2-process run differs from the 1-process run only in the order of float
sums (gradient reduce-scatter, norm all-reduce), so losses and norms agree to rtol 1e-5.
"""
import json, os, re, shutil, signal, subprocess, sys
from pathlib import Path

import pytest
import torch

from conftest import free_port as _port, subprocess_env as _env, logged_training_metrics, assert_same_training_metrics

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_dist_worker.py"
RTOL, ATOL = 1e-5, 1e-6


def _run(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    "Run the worker with `nproc` processes (1: plain python; 2: torchrun) and insist that it succeeds."
    cmd = [sys.executable, str(WORKER), *map(str, args)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_port()), str(WORKER), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def _result(d: Path) -> dict: return json.loads((d / "result.json").read_text())
def _load(p: Path) -> dict: return torch.load(p, map_location="cpu", weights_only=False)


def _assert_tree_close(a, b, rtol, atol, where="state"):
    "Nested dicts/lists of tensors and plain values: same keys, close tensors, equal plain values."
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), f"{where}: keys {sorted(a, key=str)} != {sorted(b, key=str)}"
        for k in a: _assert_tree_close(a[k], b[k], rtol, atol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)): _assert_tree_close(x, y, rtol, atol, f"{where}[{i}]")
    else: assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four runs of 6 steps (global batch 8, checkpoint at step 3): 1 process, 2 processes,
    then 1 process resumed from the 2-process step-3 checkpoint and 2 processes resumed from the 1-process one."""
    base = tmp_path_factory.mktemp("dist")
    d = {k: base / k for k in ("one", "two", "two_to_one", "one_to_two")}
    _run(1, "train", d["one"], "--ckpt", d["one"] / "ck")
    _run(2, "train", d["two"], "--ckpt", d["two"] / "ck")
    for src, dst, n in (("two", "two_to_one", 1), ("one", "one_to_two", 2)):
        (d[dst] / "ck").mkdir(parents=True)
        shutil.copytree(d[src] / "ck" / "step-3", d[dst] / "ck" / "step-3")  # resume from step 3, not the final step 6
        _run(n, "train", d[dst], "--ckpt", d[dst] / "ck", "--resume")
    return d


def test_two_processes_equal_one(runs):
    "Same global batches: the 2-process FSDP2 run's losses, pre-clip gradient norms and final weights equal the 1-process run's."
    one, two = _result(runs["one"]), _result(runs["two"])
    assert (one["world"], one["fsdp"]) == (1, "MTPTransformer") and (two["world"], two["fsdp"]) == (2, "FSDPMTPTransformer")
    assert one["steps"] == two["steps"] == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=RTOL, atol=ATOL)
    assert one["losses"][-1] < one["losses"][0] - 0.2  # it trains (not equal because nothing moved)
    # clipping (max_norm 0.3) is active at every step, and the norm of the sharded gradient is the full one
    assert min(one["norms"]) > 0.3
    torch.testing.assert_close(torch.tensor(two["norms"]), torch.tensor(one["norms"]), rtol=RTOL, atol=ATOL)
    # validation every 3 steps, each rank on half the data, reduced over ranks
    assert len(one["val"]) == 2 and one["val"][-1] < one["val"][0]  # at steps 3 and 6
    torch.testing.assert_close(torch.tensor(two["val"]), torch.tensor(one["val"]), rtol=RTOL, atol=ATOL)
    a, b = _load(runs["one"] / "final.pt"), _load(runs["two"] / "final.pt")
    assert "lm_head.weight" in a["model"] and "trunk.0.qkv.weight" in a["model"]  # plain names, not FSDP-wrapped ones
    _assert_tree_close(b["model"], a["model"], rtol=1e-4, atol=1e-5, where="model")
    _assert_tree_close(b["optimizer"], a["optimizer"], rtol=1e-4, atol=1e-5, where="optimizer")


def test_replicated_value_head(runs):
    "A replicated value head in one optimizer with the sharded model: losses, joint clipped norms and its weights match 1 process."
    one, two = _result(runs["one"])["critic"], _result(runs["two"])["critic"]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(two["norms"]), torch.tensor(one["norms"]), rtol=RTOL, atol=ATOL)
    for x, y in zip(two["vh"], one["vh"]): torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-4, atol=1e-5)


def test_head_layouts_two_processes_equal_one(tmp_path):
    "Sequential modules and MLP heads shard like parallel blocks: 2 processes give the 1-process losses, norms and weights."
    _run(1, "layouts", tmp_path / "one", "--ckpt", "-"); _run(2, "layouts", tmp_path / "two", "--ckpt", "-")
    one, two = _result(tmp_path / "one"), _result(tmp_path / "two")
    for heads in ("sequential", "mlp"):
        assert (one[heads]["fsdp"], two[heads]["fsdp"]) == ("MTPTransformer", "FSDPMTPTransformer")
        torch.testing.assert_close(torch.tensor(two[heads]["losses"]), torch.tensor(one[heads]["losses"]), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.tensor(two[heads]["norms"]), torch.tensor(one[heads]["norms"]), rtol=RTOL, atol=ATOL)
        assert one[heads]["losses"][-1] < one[heads]["losses"][0]
        assert any(k.startswith("heads.") for k in one[heads]["params"])
        for k, v in one[heads]["params"].items():
            torch.testing.assert_close(torch.tensor(two[heads]["params"][k]), torch.tensor(v), rtol=1e-4, atol=1e-5, msg=lambda m: f"{heads} {k}: {m}")


@pytest.mark.parametrize("saved,resumed", [("two", "two_to_one"), ("one", "one_to_two")])
def test_resharding(runs, saved, resumed):
    "Save with N processes, resume with M: weights and optimizer state load exactly, and training continues as uninterrupted."
    at_save, loaded = _load(runs[saved] / "state-3.pt"), _load(runs[resumed] / "loaded.pt")
    _assert_tree_close(loaded, at_save, rtol=0, atol=0)
    assert loaded["optimizer"]["state"], "the optimizer state is empty"
    res, full = _result(runs[resumed]), _result(runs["one"])
    assert res["steps"] == [4, 5, 6]  # continued from step 3, across the epoch boundary (4 batches per epoch)
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(full["losses"][3:]), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(res["val"]), torch.tensor(full["val"][1:]), rtol=RTOL, atol=ATOL)
    _assert_tree_close(_load(runs[resumed] / "final.pt")["model"], _load(runs["one"] / "final.pt")["model"], rtol=1e-4, atol=1e-5)


def _dead_rank(tmp_path, how):
    "Start the two ranks as separate processes (as on two nodes: no torchrun agent to stop the survivor)."
    port, ck = _port(), tmp_path / "ck"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "die", tmp_path / "out", "--ckpt", ck, "--timeout", "10", "--how", how],
                              cwd=ROOT, env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                                                 RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=240)  # a guard against a hang, not a timing assertion
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
            p.wait()
    assert procs[0].returncode == 3, f"rank 0 should fail with RankFailure (exit 3), got {procs[0].returncode}:\n{out}\n{err[-3000:]}"
    assert "finished without error" not in out
    assert "RankFailure: rank 0 of 2: training failed in a collective; rank 1 did not answer" in err, err[-3000:]
    if how == "kill": assert procs[1].returncode == -signal.SIGKILL
    # the last checkpoint (step 2, written before rank 1 died at step 3) is intact and loads in a fresh 1-process run
    from wmtp.checkpoint import CheckpointManager
    from wmtp.model import MTPConfig, MTPTransformer
    mgr = CheckpointManager(ck)
    assert [p.name for p in mgr.checkpoints()] == ["step-2"] and mgr.latest().name == "step-2"
    assert not list(ck.glob("*.tmp"))
    model = MTPTransformer(MTPConfig(vocab_size=32, d_model=16, n_layer=2, n_head=2, n_future=3, max_seq_len=16))  # _dist_worker.CFG
    plain = mgr.load({"model": model, "optimizer": torch.optim.AdamW(model.parameters()), "trainer": None}, restore_rng=False)
    assert plain["trainer"]["step"] == 2


def test_killed_rank_fails_fast(tmp_path):
    "Rank 1 is SIGKILLed mid-run: rank 0 stops with a RankFailure naming rank 1; the last checkpoint loads."
    _dead_rank(tmp_path, "kill")


def test_killed_rank_under_torchrun(tmp_path):
    "Under torchrun the agent sees rank 1 die (SIGKILL), stops rank 0 and names rank 1 with its exit code; step 2 stays intact."
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(WORKER), "die", tmp_path / "out", "--ckpt", ck, "--timeout", "10"]
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and "finished without error" not in p.stdout
    failed = p.stderr[p.stderr.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in failed and "exitcode  : -9" in failed, p.stderr[-3000:]
    from wmtp.checkpoint import CheckpointManager
    assert CheckpointManager(ck).latest().name == "step-2"


@pytest.mark.slow
def test_hung_rank_times_out(tmp_path):
    "Rank 1 hangs (alive, never joins a collective): rank 0 stops after the 10 s process-group timeout, naming rank 1."
    _dead_rank(tmp_path, "hang")


# ---- the wmtp command under torchrun -------------------------------------------------------------
def _cli(nproc: int, out: Path, *args, timeout: float = 400) -> subprocess.CompletedProcess:
    "`wmtp train --quick` with `nproc` processes (torchrun for 2); insist that it succeeds."
    launch = [sys.executable, "-m", "wmtp.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), "-m", "wmtp.cli"]
    cmd = [*launch, "train", "--quick", "--out", str(out), *map(str, args)]
    p = subprocess.run(cmd, cwd=out.parent, env=_env(MLFLOW_DISABLE_TELEMETRY="true"), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _check_run(out: Path, p: subprocess.CompletedProcess, steps: int, world: int):
    info = json.loads((out / "run.json").read_text())
    assert info["steps"] == steps and info["world_size"] == world, info
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / f"step-{steps}" / "manifest.json").is_file()
    assert "validation loss per head" in p.stdout, p.stdout[-2000:]
    assert all(v == v and v > 0 for v in info["final_val_loss_per_head"])  # finite, not NaN
    assert p.stdout.count("wmtp train: finished") == 1  # only rank 0 prints the summary


def test_cli_logged_training_loss_is_over_all_ranks(tmp_path):
    "Under torchrun the training loss, per-head CE and gradient norm shown and logged are the whole batch's: equal to 1 process."
    args = ["max_steps=10", "tracking.log_every=5", "optim.eval_interval=10", "checkpoints.save_interval=10"]
    p1, p2 = _cli(1, tmp_path / "one", *args), _cli(2, tmp_path / "two", *args)
    one, two = logged_training_metrics(tmp_path / "one"), logged_training_metrics(tmp_path / "two")
    assert [s for s, _ in one["train_loss"]] == [5, 10] and {"train_ce_h0", "train_ce_h3"} <= set(one)
    worst = assert_same_training_metrics(one, two, rtol=1e-5)
    print(f"largest relative difference, 2 processes vs 1: {worst:.2e}")
    shown = [re.findall(r"^step (\d+)/10  loss (\S+)", p.stdout, re.M) for p in (p1, p2)]
    assert len(shown[0]) == 2 and shown[0] == shown[1], shown  # the progress lines rank 0 prints: the same rounded loss


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "A baseline run with one process: the rho1 reference."
    out = tmp_path_factory.mktemp("cli") / "reference"
    _check_run(out, _cli(1, out, "max_steps=6", "tracking.enabled=false"), 6, 1)
    return out


# the critic's quick data (builtin tasks) with 40 tasks: with fewer, the last validation batch has 1 row,
# which wmtp.distributed.RankSlice cannot split over 2 ranks
_CRITIC = ["data.n_tasks=40", "data.seq_len=128", "model.max_seq_len=128"]  # at --quick's 64 tokens most task records do not fit


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["baseline", "critic", "rho1_weighted"])
def test_cli_two_processes(tmp_path, reference, recipe):
    "`torchrun --nproc_per_node 2 -m wmtp.cli train --quick` runs each algorithm to the end: checkpoints, weights, validation loss."
    out = tmp_path / f"run-{recipe}"
    extra = [f"reference={reference}"] if recipe.startswith("rho1") else _CRITIC if recipe == "critic" else []
    _check_run(out, _cli(2, out, "--recipe", recipe, "max_steps=8", *extra), 8, 2)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["baseline", "critic"])
def test_cli_resume_two_to_one(tmp_path, recipe):
    "A run saved by 2 processes continues with 1 (`--resume`, more steps)."
    out = tmp_path / f"run-{recipe}"  # not a folder named like the recipe: `--recipe baseline` would take it for a path
    extra = _CRITIC if recipe == "critic" else []
    _cli(2, out, "--recipe", recipe, "max_steps=6", "save_interval=3", "tracking.enabled=false", *extra)
    p = _cli(1, out, "--resume", "--recipe", recipe, "max_steps=9", "save_interval=3", "tracking.enabled=false", *extra)
    _check_run(out, p, 9, 1)
