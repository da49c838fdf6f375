"""Worker for tests/test_distributed.py: one rank of a tiny FSDP2 training run (or the only process).

Run as `python tests/_dist_worker.py MODE OUT_DIR [options]`, alone or under torchrun / with RANK etc. set.
Modes:
  train   train a tiny MTPTransformer with the weighted MTP loss in the real Learner, checkpointing;
          then a second short run with a replicated value head in the same optimizer (critic-like).
  die     train with checkpoints every 2 steps; rank 1 kills itself (SIGKILL) or hangs at step 3.
  layouts 3 plain steps of each head layout other than the default (sequential, mlp), sharded like the rest.
Rank 0 writes OUT_DIR/result.json (and full state dicts as .pt files) for the test to compare.
"""
import argparse, json, os, signal, sys, time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict  # noqa: E402
from wmtp.callbacks import CheckpointCallback  # noqa: E402
from wmtp.distributed import (DistGradClip, DistributedSamplerCallback, RankFailure, DistributedValidation, all_reduce_mean,  # noqa: E402
                              clip_grad_norm,
                              collective_errors, distributed_sampler, init_distributed, replicate_module, shard_model,
                              shutdown_distributed)
from wmtp.learner import Callback, Learner  # noqa: E402
from wmtp.loss import mtp_targets, weighted_mtp_loss  # noqa: E402
from wmtp.model import MTPConfig, MTPTransformer  # noqa: E402

torch.set_num_threads(1)
CFG = dict(vocab_size=32, d_model=16, n_layer=2, n_head=2, n_future=3, max_seq_len=16)
HEAD_W = torch.tensor([1.0, 0.5, 0.25])
GLOBAL_BATCH = 8


def dataset(n=32, seq=12, seed=1):
    "Counting sequences with random starts and strides (learnable, no padding: every rank has the same token count)."
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(0, 32, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq)) % 32
    return [{"input_ids": i, "labels": i} for i in ids]


def loss_fn(model, batch):
    "The weighted MTP loss (fused path: hidden states times the tied unembedding), heads weighted 1, 1/2, 1/4."
    out, tg = model(batch["input_ids"]), mtp_targets(batch["labels"], 3)
    w = HEAD_W.expand(tg.shape)
    res = weighted_mtp_loss(targets=tg, hidden=out.hidden, unembedding=model.unembedding, weights=w)
    return res.loss, (w * res.valid[..., None]).sum(), {}


def full_state(model, opt):
    "Full (unsharded) model and optimizer state dicts, keyed by parameter names, on rank 0 (collective)."
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"model": get_model_state_dict(model, options=o), "optimizer": get_optimizer_state_dict(model, opt, options=o)}


class Record(Callback):
    "Per-step global loss and pre-clip gradient norm; full state dumps when loaded and at `dump_at`."
    order = 95  # after CheckpointCallback (90): its before_fit has loaded the checkpoint
    def __init__(self, ctx, out, dump_at):
        self.ctx, self.out, self.dump_at = ctx, Path(out), dump_at
        self.losses, self.norms, self.steps, self.val = [], [], [], []
    def _dump(self, name):
        sd = full_state(self.learn.model, self.learn.opt)
        if self.ctx.is_main: torch.save(sd, self.out / name)
    def before_fit(self):
        if self.learn.step: self._dump("loaded.pt")
    def after_loss(self):
        if self.learn.training: self.losses.append(all_reduce_mean(self.learn.loss, self.ctx).item())
    def after_validate(self): self.val.append(self.learn.metrics["val_loss"])  # after DistributedValidation (order -40)
    def after_step(self):
        self.norms.append(float(self.learn.grad_norm)); self.steps.append(self.learn.step)
        if self.learn.step == self.dump_at: self._dump(f"state-{self.learn.step}.pt")


def make_learner(ctx, args, cbs):
    torch.manual_seed(0)
    model = shard_model(MTPTransformer(MTPConfig(**CFG)), ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.01)
    ds = dataset()
    sampler = distributed_sampler(ds, ctx, shuffle=True, seed=5, always=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=GLOBAL_BATCH // ctx.world_size, sampler=sampler)
    vds = dataset(16, seed=2)
    vdl = torch.utils.data.DataLoader(vds, batch_size=GLOBAL_BATCH // ctx.world_size,
                                      sampler=distributed_sampler(vds, ctx, shuffle=False, always=True))
    cbs = [DistributedSamplerCallback(sampler), DistGradClip(max_norm=0.3), DistributedValidation(ctx), *cbs]
    return Learner(model, dl, loss_fn, opt, valid_dl=vdl, valid_every=3, cbs=cbs)


def train(ctx, args):
    out = Path(args.out)
    rec = Record(ctx, out, args.dump_at)
    ck = CheckpointCallback(args.ckpt, save_interval=args.save_every, keep_last=10, resume=args.resume, verbose=False)
    learn = make_learner(ctx, args, [ck, rec])
    with collective_errors(ctx, "training"): learn.fit(max_steps=args.steps)
    final = full_state(learn.model, learn.opt)
    res = {"world": ctx.world_size, "losses": rec.losses, "val": rec.val, "norms": rec.norms, "steps": rec.steps,
           "fsdp": type(learn.model).__name__, "critic": critic(ctx)}
    if ctx.is_main:
        torch.save(final, out / "final.pt")
        (out / "result.json").write_text(json.dumps(res))


def critic(ctx, steps=3):
    "A replicated value head trained with the sharded model in one optimizer, clipped together: losses, norms, weights."
    torch.manual_seed(0)
    model = shard_model(MTPTransformer(MTPConfig(**CFG)), ctx)
    vh = replicate_module(nn.Sequential(nn.RMSNorm(16), nn.Linear(16, 1)), ctx)
    opt = torch.optim.AdamW([*model.parameters(), *vh.parameters()], lr=2e-2)
    ids = torch.stack([d["input_ids"] for d in dataset()])
    losses, norms = [], []
    for s in range(steps):
        batch = ids[GLOBAL_BATCH * s: GLOBAL_BATCH * (s + 1)][ctx.rank::ctx.world_size]
        out = model(batch)
        reward = (batch[:, :1] % 2).float().expand(batch.shape)  # a per-sequence "reward" the value head fits
        loss = weighted_mtp_loss(targets=mtp_targets(batch, 3), hidden=out.hidden, unembedding=model.unembedding).loss
        loss = loss + ((vh(out.trunk.detach())[..., 0] - reward) ** 2).mean()
        loss.backward()
        norms.append(float(clip_grad_norm([*model.parameters(), *vh.parameters()], 0.3)))
        opt.step(); opt.zero_grad()
        losses.append(all_reduce_mean(loss, ctx).item())
    return {"losses": losses, "norms": norms, "vh": [p.detach().flatten().tolist() for p in vh.parameters()]}


def die(ctx, args):
    "Checkpoint every 2 steps; at step 3 rank 1 is SIGKILLed (or hangs); the others must fail with RankFailure."
    class Kill(Callback):
        def after_backward(self):
            if self.learn.step == 2 and ctx.rank == 1:  # the 3rd batch: after the step-2 checkpoint
                if args.how == "kill": os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # hang: alive, but never joins the next collective
    ck = CheckpointCallback(args.ckpt, save_interval=2, keep_last=3, verbose=False)
    learn = make_learner(ctx, args, [ck, Kill()])
    try:
        with collective_errors(ctx, "training"): learn.fit(max_steps=args.steps)
    except RankFailure as e:
        print(f"RankFailure: {e}", file=sys.stderr, flush=True)
        shutdown_distributed(ctx, wait=False)
        os._exit(3)  # skip interpreter teardown of a process group whose peer is gone
    print("finished without error", flush=True)


def layouts(ctx, args, steps=3):
    "Each non-default head layout sharded by shard_model: per-step global losses and clipped norms, and the final weights."
    ids, res = torch.stack([d["input_ids"] for d in dataset()]), {}
    for heads in ("sequential", "mlp"):
        torch.manual_seed(0)
        model = shard_model(MTPTransformer(MTPConfig(**CFG, heads=heads)), ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        losses, norms = [], []
        for s in range(steps):
            batch = ids[GLOBAL_BATCH * s: GLOBAL_BATCH * (s + 1)][ctx.rank::ctx.world_size]
            loss, _, _ = loss_fn(model, {"input_ids": batch, "labels": batch})
            loss.backward()
            norms.append(float(clip_grad_norm(list(model.parameters()), 0.3)))
            opt.step(); opt.zero_grad()
            losses.append(all_reduce_mean(loss, ctx).item())
        sd = full_state(model, opt)["model"]
        res[heads] = {"losses": losses, "norms": norms, "fsdp": type(model).__name__, "params": {k: v.flatten().tolist() for k, v in sd.items()}}
    if ctx.is_main: (Path(args.out) / "result.json").write_text(json.dumps(res))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "die", "layouts"])
    p.add_argument("out")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--dump-at", type=int, default=3)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--how", default="kill", choices=["kill", "hang"])
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    ctx = init_distributed("cpu", timeout_s=args.timeout)
    with ctx: {"train": train, "die": die, "layouts": layouts}[args.mode](ctx, args)
    # gloo's threads can abort a finished process during interpreter teardown when the machine is loaded
    # ("terminate called without an active exception", exit -6): the work is done and written, so skip teardown
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
