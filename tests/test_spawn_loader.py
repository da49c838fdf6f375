"""The Learner demo's loader with workers (07_learner, "Releasing workers") under the `spawn` start method, which macOS uses."""
import os, multiprocessing

import pytest, torch
from torch.utils.data import DataLoader

from wmtp.learner import Callback, Learner
from wmtp.testing import PidTokens, TinyLM, tiny_lm_loss


class FailAt(Callback):
    def __init__(self): self.pids = set()
    def before_batch(self): self.pids |= set(self.learn.batch["pid"].tolist())
    def after_step(self):
        if self.learn.step == 3: raise RuntimeError("failure in the middle of an epoch")


def test_learner_demo_loader_under_spawn():
    torch.manual_seed(0)
    model = TinyLM()
    dl = DataLoader(PidTokens(64), batch_size=8, num_workers=1, persistent_workers=True,
                    multiprocessing_context=multiprocessing.get_context("spawn"))
    fail = FailAt()
    with pytest.raises(RuntimeError, match="middle of an epoch"):
        with Learner(model, dl, tiny_lm_loss, torch.optim.SGD(model.parameters(), lr=0.1), cbs=[fail]) as learn:
            learn.fit(2)
    (pid,) = fail.pids
    assert pid != os.getpid()  # a spawned worker loaded the batches: it found PidTokens by its module
    with pytest.raises(ProcessLookupError): os.kill(pid, 0)  # and leaving the Learner shut it down
    assert dl._iterator is None


def test_a_notebook_class_fails_under_spawn():
    "Why the dataset lives in the package: a class a spawned worker cannot import fails to load there."
    import __main__
    Local = type("Local", (torch.utils.data.Dataset,), {"__len__": lambda s: 2, "__getitem__": lambda s, i: torch.tensor(i),
                                                       "__module__": "__main__"})
    setattr(__main__, "Local", Local)  # picklable here, yet the spawned interpreter's __main__ has no Local
    try:
        dl = DataLoader(Local(), batch_size=1, num_workers=1, multiprocessing_context=multiprocessing.get_context("spawn"))
        with pytest.raises(Exception): next(iter(dl))
    finally: delattr(__main__, "Local")
