"""Worker for tests/test_accumulation_dist.py: one SGD step of TinyLM on 8 sequences split over the ranks.

Run as `python tests/_accum_worker.py OUT_DIR`, alone or under torchrun; rank 0 writes OUT_DIR/MODE.pt
(the full parameters after the step) for each mode: `acc2` (GradAccumulation(2), 2 micro-batches per
rank), `acc1` (GradAccumulation(1)), `plain` (no callback: the rank means are averaged, a mean of means).
"""
import os, sys, warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from wmtp.callbacks import GradAccumulation  # noqa: E402
from wmtp.learner import Learner  # noqa: E402
from wmtp.testing import TinyLM, synth_tokens, tiny_lm_loss  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="FSDP2-wrapped module")


def one_step(mode: str, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = TinyLM()
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for h in model.heads: fully_shard(h)
        fully_shard(model)
    data = synth_tokens(8, seed=3)
    part = data[rank * 8 // world:(rank + 1) * 8 // world]
    n_acc = {"acc2": 2, "acc1": 1, "plain": 1}[mode]
    cbs = [] if mode == "plain" else [GradAccumulation(n_acc)]
    learn = Learner(model, DataLoader(part, batch_size=len(part) // n_acc), tiny_lm_loss,
                    torch.optim.SGD(model.parameters(), lr=1.0), cbs=cbs)
    learn.fit(max_steps=1)
    assert learn.step == 1 and learn.batch_in_epoch == n_acc
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main():
    out = Path(sys.argv[1])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1: dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    for mode in ("acc2", "acc1", "plain"):
        sd = one_step(mode, rank, world)
        if rank == 0: torch.save(sd, out / f"{mode}.pt")
    if world > 1: dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's threads can abort a finished process during interpreter teardown when the machine is loaded
    # ("terminate called without an active exception", exit -6): the work is done and written, so skip teardown
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
