"""Worker processes for tests/test_checkpoint.py: exact resume, saving under SIGKILL, a full disk, FSDP2.

Run as `python tests/_ckpt_worker.py MODE ARGS...`; every mode prints one JSON line as its result.
"""
import json, os, random, resource, signal, socket, sys, time, warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wmtp.checkpoint import CheckpointManager, export_safetensors  # noqa: E402

torch.set_num_threads(1)  # light on a shared machine, and safe to fork from
warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # our blocks use no in-place ops on outputs


# ---- exact resume -------------------------------------------------------------------------------
class RunningMean:
    "A stateful extra (like a weighter's whitening statistics) that changes the loss."
    def __init__(self): self.mean, self.n = torch.zeros(()), 0
    def update(self, x):
        self.n += 1
        self.mean += (x.detach() - self.mean) / self.n
    def state_dict(self): return {"mean": self.mean.clone(), "n": self.n}
    def load_state_dict(self, sd): self.mean, self.n = sd["mean"].clone(), sd["n"]


def resume_parts(seed, total):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=total)  # also moves betas
    return model, opt, sched, RunningMean()


def loader(epoch):
    g = torch.Generator().manual_seed(123)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    # a generator per epoch: the shuffle order then depends only on the epoch, not on the global RNG
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1000 + epoch))


def train(model, opt, sched, stats, step, end, epoch, batch):
    "Train from (step, epoch, batch in epoch) to `end` steps; return the new position."
    model.train()
    while step < end:
        for i, (x, y) in enumerate(loader(epoch)):
            if i < batch: continue  # the data position of a resumed run
            loss = F.cross_entropy(model(x), y) * (1 + 0.1 * stats.mean)
            opt.zero_grad(); loss.backward(); opt.step(); sched.step(); stats.update(loss)
            step, batch = step + 1, i + 1
            if step == end: break
        else: epoch, batch = epoch + 1, 0
    return step, epoch, batch


def resume(mode, directory, total, k, out):
    total, k = int(total), int(k)
    model, opt, sched, stats = resume_parts(99 if mode.startswith("rest") else 0, total)
    random.seed(5); torch.manual_seed(7)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "weighter": stats}
    if mode == "uninterrupted": pos = train(model, opt, sched, stats, 0, total, 0, 0)
    elif mode == "first":
        step, epoch, batch = train(model, opt, sched, stats, 0, k, 0, 0)
        CheckpointManager(directory).save(step, {**state, "trainer": {"step": step, "epoch": epoch, "batch_in_epoch": batch}})
        pos = (step, epoch, batch)
    else:
        t = CheckpointManager(directory).load({**state, "trainer": None}, restore_rng=mode == "rest")["trainer"]
        pos = train(model, opt, sched, stats, t["step"], total, t["epoch"], t["batch_in_epoch"])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "weighter": stats.state_dict()}, out)
    print(json.dumps({"position": pos}))


# ---- saving under SIGKILL -----------------------------------------------------------------------
def _save_forever(directory):
    "Child process: save checkpoints as fast as it can; weights and the plain step agree in each one."
    mgr, net = CheckpointManager(directory, keep_last=2), nn.Linear(64, 64)
    last = mgr.latest()
    step = int(last.name.split("-")[1]) + 1 if last else 1
    while True:
        with torch.no_grad(): net.weight.fill_(step); net.bias.fill_(-step)
        mgr.save(step, {"model": net, "trainer": {"step": step}})
        step += 1


def crash(directory, rounds, seed):
    "Fork a saver, SIGKILL it at a random moment, check that the newest checkpoint loads; repeat."
    rng, directory = random.Random(int(seed)), Path(directory)
    steps, mid_save, damaged = [], 0, 0
    for _ in range(int(rounds)):
        pid = os.fork()
        if pid == 0:
            try: _save_forever(directory)
            finally: os._exit(1)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_save += any(directory.glob("*.tmp"))  # the kill interrupted a write, a rename or a deletion
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr = CheckpointManager(directory, keep_last=2)
            path = mgr.latest()
            if path is not None:
                net = nn.Linear(64, 64)
                trainer = mgr.load({"model": net}, restore_rng=False)["trainer"]
                assert not path.name.endswith(".tmp"), path
                assert path.name == f"step-{trainer['step']}", (path, trainer)
                assert bool((net.weight == trainer["step"]).all() and (net.bias == -trainer["step"]).all()), path
                steps.append(trainer["step"])
        damaged += len(caught)
    print(json.dumps({"steps": steps, "mid_save": mid_save, "warnings": damaged}))


# ---- a full disk --------------------------------------------------------------------------------
def disk_full(directory):
    "Save once, then limit the size of any file this process writes (a full disk) and save again."
    mgr = CheckpointManager(directory)
    mgr.save(1, {"model": nn.Linear(4, 4)})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        mgr.save(2, {"model": nn.Linear(64, 64)})
        err = None
    except OSError as e: err = str(e)
    finally: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print(json.dumps({"error": err, "checkpoints": [p.name for p in mgr.checkpoints()],
                      "latest": mgr.latest().name, "left": sorted(p.name for p in Path(directory).iterdir())}))


# ---- FSDP2 on two processes (gloo) --------------------------------------------------------------
class TiedNet(nn.Module):
    "Embedding, two blocks and an unembedding tied to the embedding."
    def __init__(self, vocab=17, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks: h = h + torch.tanh(b(h))
        return self.out(h)


def fsdp_step(model, opt, seed):
    ids = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(seed))
    loss = F.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
    opt.zero_grad(); loss.backward(); opt.step()


def _fsdp_model(seed, mesh):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = TiedNet()
    for b in model.blocks: fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _fsdp_rank(rank, world, port, save_dir, plain_dir, out):
    "One rank: train a sharded model and save it; load a plain checkpoint into a fresh sharded model."
    from datetime import timedelta
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        gathered = lambda m, o: {"model": get_model_state_dict(m, options=full), "optimizer": get_optimizer_state_dict(m, o, options=full)}
        model, opt = _fsdp_model(0, mesh)
        for s in range(2): fsdp_step(model, opt, 10 * s + rank)
        CheckpointManager(save_dir).save(2, {"model": model, "optimizer": opt, "trainer": {"step": 2}})
        export_safetensors(model, Path(save_dir) / "weights.safetensors")
        saved = gathered(model, opt)
        model2, opt2 = _fsdp_model(42, mesh)
        plain = CheckpointManager(plain_dir).load({"model": model2, "optimizer": opt2, "trainer": None})
        loaded = gathered(model2, opt2)
        shard = model.blocks[0].weight
        if rank == 0:
            torch.save({"saved": saved, "loaded": loaded}, out)
            print(json.dumps({"sharded": type(shard).__name__, "local_rows": shard.to_local().shape[0], "plain": plain}))
    finally:
        dist.destroy_process_group()


def _fsdp_child(*args):
    "Rank 1's process: its work, then an exit that skips interpreter teardown."
    _fsdp_rank(*args)  # an error here still ends the process with a non-zero exit code
    # seen under heavy load: gloo's threads abort a finished process during teardown ("terminate called
    # without an active exception", exit -6) after all its work is done and checked
    os._exit(0)


def fsdp(save_dir, plain_dir, out):
    "Two ranks on gloo: this process is rank 0, a spawned one rank 1."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    other = torch.multiprocessing.get_context("spawn").Process(target=_fsdp_child, args=(1, 2, port, save_dir, plain_dir, out))
    other.start()
    try: _fsdp_rank(0, 2, port, save_dir, plain_dir, out)
    finally: other.join(timeout=180)
    assert other.exitcode == 0, f"rank 1 exited with {other.exitcode}"


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode in ("uninterrupted", "first", "rest", "rest_norng"): resume(mode, *args)
    else: {"crash": crash, "disk_full": disk_full, "fsdp": fsdp}[mode](*args)
