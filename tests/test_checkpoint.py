"""Checkpoints across real process boundaries: exact resume, SIGKILL during saves, a full disk, FSDP2 on two ranks."""
import json, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from wmtp.checkpoint import CheckpointManager, load_safetensors

sys.path.insert(0, str(Path(__file__).parent))
from _ckpt_worker import TiedNet, fsdp_step  # noqa: E402

WORKER = Path(__file__).parent / "_ckpt_worker.py"


def worker(*args, timeout=240):
    "Run the worker script in a new interpreter; return its JSON result line."
    r = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"worker {args[0]} failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_same(a: dict, b: dict):
    "Bitwise equal tensors under the same nested keys."
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict): assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor): assert torch.equal(a[k], b[k]), k
        else: assert a[k] == b[k], k


N, K = 12, 7  # 5 batches an epoch: the resume point lies in the middle of the second epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "An uninterrupted N-step run and a K-step run that saved a checkpoint, each in its own process."
    d = tmp_path_factory.mktemp("resume")
    assert worker("uninterrupted", d / "a", N, 0, d / "full.pt") == {"position": [12, 2, 2]}
    assert worker("first", d / "ckpt", N, K, d / "first.pt") == {"position": [7, 1, 2]}
    return d


def test_exact_resume_in_a_new_process(runs):
    "A new process loads the K-step checkpoint and goes on to N: bitwise the uninterrupted N-step run."
    assert worker("rest", runs / "ckpt", N, K, runs / "rest.pt") == {"position": [12, 2, 2]}
    full, first, rest = (torch.load(runs / f, weights_only=True) for f in ("full.pt", "first.pt", "rest.pt"))
    assert_same(full["model"], rest["model"])
    assert_same(full["optimizer"], rest["optimizer"])  # moments, step counts, lr and betas moved by OneCycleLR
    assert_same(full["weighter"], rest["weighter"])
    assert not torch.equal(full["model"]["0.weight"], first["model"]["0.weight"])  # the last N-K steps did change it


def test_resume_without_rng_differs(runs):
    "The same resume without restoring the RNG states (other dropout masks) differs: the check above has teeth."
    worker("rest_norng", runs / "ckpt", N, K, runs / "rest_norng.pt")
    full, rest = (torch.load(runs / f, weights_only=True) for f in ("full.pt", "rest_norng.pt"))
    assert not torch.equal(full["model"]["0.weight"], rest["model"]["0.weight"])


def test_sigkill_during_saves(tmp_path):
    "A saver is SIGKILLed at random moments 20 times; the newest checkpoint always loads and is consistent."
    res = worker("crash", tmp_path, 20, 1234)
    assert len(res["steps"]) >= 15, res  # (the worker asserted, after every kill, that weights match the step)
    assert res["steps"] == sorted(res["steps"]) and res["steps"][-1] > 20, res
    assert res["mid_save"] >= 5, res  # most kills landed inside a save and left a *.tmp folder behind
    assert res["warnings"] == 0, res  # no half-written folder was ever mistaken for a checkpoint
    mgr = CheckpointManager(tmp_path, keep_last=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.latest().name == f"step-{res['steps'][-1]}"
        net = torch.nn.Linear(64, 64)
        step = mgr.load({"model": net}, restore_rng=False)["trainer"]["step"]
    assert bool((net.weight == step).all())
    assert all(not p.name.endswith(".tmp") for p in mgr.checkpoints())


def test_full_disk_keeps_earlier_checkpoints(tmp_path):
    "A save that cannot write its files (file size limit: a full disk) is an OSError; step-1 stays good."
    res = worker("disk_full", tmp_path)
    assert res["error"] is not None and "could not write checkpoint step 2 into" in res["error"], res
    assert str(tmp_path) in res["error"]
    assert res["checkpoints"] == ["step-1"] and res["latest"] == "step-1", res
    assert res["left"] == ["latest", "step-1"], res  # no partial folder left behind


def test_fsdp2_checkpoint_to_plain_and_back(tmp_path):
    "FSDP2 (2 ranks, gloo) saves and a plain model loads it exactly; a plain checkpoint loads into FSDP2 exactly."
    torch.manual_seed(3)
    src = TiedNet()
    src_opt = torch.optim.AdamW(src.parameters(), lr=1e-2)
    fsdp_step(src, src_opt, 99)
    CheckpointManager(tmp_path / "plain").save(5, {"model": src, "optimizer": src_opt, "trainer": {"step": 5}})

    res = worker("fsdp", tmp_path / "fsdp", tmp_path / "plain", tmp_path / "out.pt")
    assert res == {"sharded": "DTensor", "local_rows": 4, "plain": {"trainer": {"step": 5}}}, res  # half an 8x8 block each
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    # plain -> FSDP2: the sharded model and optimizer hold exactly the plain values
    assert_same(out["loaded"]["model"], src.state_dict())
    assert_same(out["loaded"]["optimizer"]["state"], get_optimizer_state_dict(src, src_opt)["state"])

    # FSDP2 -> plain, in this single process
    torch.manual_seed(4)
    plain = TiedNet()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    mgr = CheckpointManager(tmp_path / "fsdp")
    assert mgr.load({"model": plain, "optimizer": opt, "trainer": None}, restore_rng=False) == {"trainer": {"step": 2}}
    assert_same(plain.state_dict(), out["saved"]["model"])
    assert_same(get_optimizer_state_dict(plain, opt)["state"], out["saved"]["optimizer"]["state"])
    assert plain.out.weight is plain.emb.weight  # still tied after loading
    assert sorted(p.name for p in mgr.latest().glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]

    inference = load_safetensors(TiedNet(), tmp_path / "fsdp" / "weights.safetensors")
    assert_same(inference.state_dict(), out["saved"]["model"])
