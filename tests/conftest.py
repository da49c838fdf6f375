"""pytest settings for wmtp: the `slow` mark, a clean environment for every test, and the tests' shared helpers."""
import os, shutil, signal, socket, subprocess, sys, time
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


def wmtp_cli(*args, check: bool = False, timeout: float = 600, env: dict | None = None, cwd=None, script: bool = False):
    "Run the `wmtp` command line (`python -m wmtp.cli`; the installed console script with `script=True`, when there is one)."
    exe = shutil.which("wmtp") if script else None
    cmd = [exe] if exe else [sys.executable, "-m", "wmtp.cli"]
    cmd += [str(a) for a in args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check: assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def kill_once_written(cmd: list, marker: Path, env: dict | None = None, then: float = 0.0):
    "Start `cmd`, wait until `marker` exists (progress-based: however fast the machine), `then` seconds more, and SIGKILL it."
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not marker.exists() and p.poll() is None and time.time() < deadline: time.sleep(0.02)
    time.sleep(then)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL); p.wait()


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
