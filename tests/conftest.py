"""pytest settings for wmtp: the `slow` mark, a clean environment for every test, and the tests' shared helpers."""
import os, socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests (a real mlflow server, long runs); run with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("WMTP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on now (for torchrun's rendezvous, or a server)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    "The environment for a worker process: this checkout's wmtp first on PYTHONPATH, one torch thread."
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def logged_training_metrics(run_dir) -> dict:
    "What a finished `wmtp train` run logged to its MLflow store during training: {key: [(step, value)]} (train_*, grad_norm)."
    import json
    from mlflow.tracking import MlflowClient
    info = json.loads((Path(run_dir) / "run.json").read_text())
    client = MlflowClient(info["tracking_uri"])
    keys = [k for k in client.get_run(info["run_id"]).data.metrics if k.startswith("train_") or k == "grad_norm"]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(info["run_id"], k)) for k in keys}


def assert_same_training_metrics(one: dict, two: dict, rtol: float = 1e-5) -> float:
    "The two runs logged the same keys at the same steps and values equal at `rtol`; the largest relative difference."
    import torch
    assert sorted(one) == sorted(two) and "train_loss" in one and "grad_norm" in one, (sorted(one), sorted(two))
    worst = 0.0
    for k in one:
        assert [s for s, _ in one[k]] == [s for s, _ in two[k]], (k, one[k], two[k])
        a, b = torch.tensor([v for _, v in one[k]], dtype=torch.float64), torch.tensor([v for _, v in two[k]], dtype=torch.float64)
        torch.testing.assert_close(b, a, rtol=rtol, atol=0, msg=lambda m: f"{k}: {m}")
        worst = max(worst, float(((b - a).abs() / a.abs()).max()))
    return worst
