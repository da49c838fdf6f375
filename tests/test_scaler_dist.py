"""fp16 loss scaling across real processes: 2 gloo ranks, only rank 1 sees an inf gradient.

With `DistGradScaler` (what `init_distributed` gives a policy) every rank skips that step and halves its
scale, with plain parameters and with FSDP2 (DTensor gradient shards). With torch's own `GradScaler`,
plain (non-DTensor) parameters drift: rank 0 steps and keeps its scale while rank 1 skips and halves.
FSDP2's DTensor gradients do not drift even there: since pytorch PR #132816 (torch 2.6) DTensor reduces
`found_inf` itself; the test records that too, so a change in torch shows up here.
This file is also the worker: torchrun runs it as a script.
"""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(scaler_name: str, fsdp: bool, ctx, out: Path):
    "Two steps: rank 1 poisons one gradient in the first, nobody in the second. Writes what each rank saw."
    from torch import nn
    from wmtp.distributed import DistGradScaler
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=ctx.mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cls = DistGradScaler if scaler_name == "dist" else torch.amp.GradScaler
    scaler = cls("cpu", init_scale=1024.0, growth_interval=1000)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    rec = []
    for step in range(2):
        before = [local(p).detach().clone() for p in model.parameters()]
        x = torch.full((2, 4), 1.0 + ctx.rank)
        scaler.scale(model(x).square().sum()).backward()
        if step == 0 and ctx.rank == 1:
            with torch.no_grad(): local(model.weight.grad).view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        stepped = any(not torch.equal(b, local(p).detach()) for b, p in zip(before, model.parameters()))
        rec.append(dict(scale=scaler.get_scale(), stepped=stepped))
    (out / f"{scaler_name}-{'fsdp' if fsdp else 'plain'}-rank{ctx.rank}.json").write_text(json.dumps(rec))


def _worker(out: Path):
    from wmtp.distributed import DistGradScaler, init_distributed, barrier
    from wmtp.policy import Capabilities, DevicePolicy
    policy = DevicePolicy("cpu", caps=Capabilities(), verbose=False)
    with init_distributed(policy, backend="gloo", timeout_s=60) as ctx:
        assert ctx.world_size == 2 and policy.scaler_cls is DistGradScaler, policy.scaler_cls
        for fsdp in (False, True):
            for name in ("dist", "plain"):
                _run(name, fsdp, ctx, out)
                barrier(ctx)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from conftest import free_port, subprocess_env
    out = tmp_path_factory.mktemp("scaler")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}


@pytest.mark.parametrize("kind", ["plain", "fsdp"])
def test_every_rank_skips_and_keeps_one_scale(results, kind):
    r0, r1 = results[f"dist-{kind}-rank0"], results[f"dist-{kind}-rank1"]
    assert [s["stepped"] for s in r0] == [s["stepped"] for s in r1] == [False, True]  # both skip step 0, both take step 1
    assert [s["scale"] for s in r0] == [s["scale"] for s in r1] == [512.0, 512.0]   # halved once, the same everywhere


def test_torch_scaler_alone_drifts_on_plain_parameters(results):
    r0, r1 = results["plain-plain-rank0"], results["plain-plain-rank1"]
    assert (r0[0]["stepped"], r0[0]["scale"]) == (True, 1024.0)   # rank 0 found nothing: stepped, kept its scale
    assert (r1[0]["stepped"], r1[0]["scale"]) == (False, 512.0)   # rank 1 skipped and halved


def test_torch_scaler_agrees_on_dtensor_gradients(results):
    r0, r1 = results["plain-fsdp-rank0"], results["plain-fsdp-rank1"]
    assert r0 == r1 and [s["stepped"] for s in r0] == [False, True]  # DTensor all-reduces found_inf (torch >= 2.6)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    # gloo's threads can abort a finished process during interpreter teardown when the machine is loaded
    # ("terminate called without an active exception", exit -6): the work is done and written, so skip teardown
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
