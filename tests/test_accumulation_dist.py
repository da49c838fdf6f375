"""GradAccumulation across real processes: 2 gloo ranks with FSDP2 take the same step as one process on the whole batch.

The 8 sequences count different numbers of tokens, so each rank's loss is a mean over a different count:
averaging the ranks' gradients (what FSDP2 does) is a mean of means, GradAccumulation makes it the mean
over all tokens. Tolerance: fp32 on CPU, only the order of float sums differs.
"""
import subprocess, sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from conftest import free_port as _port, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_accum_worker.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_port()), str(WORKER), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return {m: torch.load(out / f"{m}.pt", map_location="cpu", weights_only=True) for m in ("acc2", "acc1", "plain")}


@pytest.fixture(scope="module")
def reference():
    "One process, one batch of all 8 sequences, one SGD step."
    sys.path.insert(0, str(ROOT))
    from wmtp.testing import TinyLM, synth_tokens, tiny_lm_loss
    torch.manual_seed(0)
    model = TinyLM()
    data = synth_tokens(8, seed=3)
    assert len({int((d["labels"] != -100).sum()) for d in data[:4]} | {int((d["labels"] != -100).sum()) for d in data[4:]}) > 1
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tiny_lm_loss(model, default_collate(data))[0].backward()
    opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["acc2", "acc1"])
def test_two_ranks_equal_one_batch(two_ranks, reference, mode):
    "2 ranks x 2 micro-batches x 2 sequences, and 2 ranks x 1 batch x 4 sequences, equal 1 batch of 8."
    for k, v in reference.items():
        torch.testing.assert_close(two_ranks[mode][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode} {k}: {m}")


def test_plain_data_parallel_is_a_mean_of_means(two_ranks, reference):
    "Without GradAccumulation the step differs from the whole-batch step by far more than the tolerance."
    diff = max((two_ranks["plain"][k] - v).abs().max().item() for k, v in reference.items())
    assert diff > 1e-4, diff
