"""wmtp.track against real servers: an unreachable one (fast) and a real `mlflow server` (slow)."""
import json, os, signal, subprocess, sys, time, urllib.request, warnings
from pathlib import Path

import pytest

from wmtp.track import Tracker
from conftest import free_port


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(autouse=True)
def no_inherited_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_unreachable_server_falls_back_to_jsonl(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(tmp_path, tracking_uri=uri, flush_every=3)
        tracker.log_params({"lr": 0.01})
        for step in range(1, 11):
            tracker.log_metrics({"loss": 1.0 / step, "head1_loss": 2.0 / step}, step=step)
        tracker.end()
    ours = [w for w in caught if "MLflow tracking at" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert uri in str(ours[0].message)
    assert tracker.fallback and tracker.run_id is None
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["key"]) for r in rows] == [(s, k) for s in range(1, 11) for k in ("loss", "head1_loss")]
    assert rows[4]["value"] == pytest.approx(1.0 / 3)
    assert json.loads((tmp_path / "tracking.json").read_text())["params"] == {"lr": "0.01"}


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 120.0):   # 13-51 s seen on a busy machine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} did not answer /health within {timeout} s")


def _stop(proc: subprocess.Popen):
    "Stop the server and its workers: the process group this test started."
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_real_mlflow_server(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    log = open(tmp_path / "server.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}",
         "--artifacts-destination", (tmp_path / "server-artifacts").as_uri(), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    try:
        _wait_health(url, proc)
        print(f"server answered /health after {time.monotonic() - t0:.1f} s")
        out = tmp_path / "run"
        with Tracker(out, tracking_uri=url, experiment="server-test", flush_every=4) as tracker:
            tracker.log_params({"lr": 3e-4, "algo": "critic"})
            for step in range(1, 11):
                tracker.log_metrics({"loss": 1.0 / step}, step=step)
            (tmp_path / "notes.txt").write_text("hi")
            tracker.log_artifact(tmp_path / "notes.txt")
        run_id = tracker.run_id
        assert not tracker.fallback and run_id is not None
        client = MlflowClient(url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params == {"lr": "0.0003", "algo": "critic"}
        hist = client.get_metric_history(run_id, "loss")
        assert [m.step for m in hist] == list(range(1, 11))
        assert [m.value for m in hist] == pytest.approx([1.0 / s for s in range(1, 11)])
        assert [a.path for a in client.list_artifacts(run_id)] == ["notes.txt"]
        assert not (out / "metrics.jsonl").exists()

        # Resume into the same run, then the server dies mid-run: one warning, nothing lost.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = Tracker(out, tracking_uri=url, run_id=run_id, flush_every=4)
            for step in range(11, 15):
                resumed.log_metrics({"loss": 1.0 / step}, step=step)
            resumed.flush()   # steps 11-14 are stored on the server
            resumed.log_metrics({"loss": 1.0 / 15}, step=15)   # waits in the buffer
            _stop(proc)
            for step in range(16, 20):   # the batch of 15-18 fails; then fallback
                resumed.log_metrics({"loss": 1.0 / step}, step=step)
            resumed.end()
        ours = [w for w in caught if "MLflow tracking at" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(15, 20))
        assert resumed.fallback and resumed.run_id == run_id
    finally:
        _stop(proc)
        log.close()
    print(f"slow server test took {time.monotonic() - t0:.1f} s")


_PROGRESS_SCRIPT = """
from wmtp.progress import TrainingProgress, progress_mode
print("mode", progress_mode())
with TrainingProgress(total=30, log_every=10) as pb:
    for s in range(1, 31):
        pb.update(s, {"loss": 1.0 / s})
print("done")
"""


def test_progress_in_a_pipe_prints_plain_lines():
    out = subprocess.run([sys.executable, "-c", _PROGRESS_SCRIPT], capture_output=True, text=True, check=True).stdout
    assert "\r" not in out
    lines = out.splitlines()
    assert lines[0] == "mode lines" and lines[-1] == "done"
    assert [line.split()[1] for line in lines[1:-1]] == ["10/30", "20/30", "30/30"]


def test_progress_in_a_terminal_draws_a_bar():
    import pty
    main, sub = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _PROGRESS_SCRIPT], stdout=sub, stderr=subprocess.STDOUT)
    os.close(sub)
    chunks = []
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:   # the terminal closes when the process exits
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait(timeout=60) == 0
    out = b"".join(chunks).decode()
    assert out.startswith("mode bar")
    assert "\r" in out and "100.00% [30/30" in out and "loss 0.03333" in out
    assert "step 10/30" not in out


@pytest.mark.slow
def test_progress_in_a_jupyter_kernel_shows_bar_and_plot():
    from jupyter_client.manager import KernelManager
    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv[0] = sys.executable   # the kernel must see this environment's wmtp
    km.start_kernel()
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute(_PROGRESS_SCRIPT)
        streams, mimes, errors = [], set(), []
        while True:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                streams.append(content["text"])
            elif kind in ("display_data", "update_display_data"):
                mimes.update(content["data"])
            elif kind == "error":
                errors.append(f"{content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                break
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert errors == []
    assert "".join(streams).splitlines() == ["mode notebook", "done"]   # no plain lines in Jupyter
    assert {"text/html", "image/png"} <= mimes   # the HTML bar and the live loss plot


@pytest.mark.slow   # a new store migrates in the child process: 5-30 s here
def test_tracker_not_ended_is_ended_at_exit(tmp_path):
    """A script that never calls end(): its buffered metrics reach the store when it exits."""
    from mlflow.tracking import MlflowClient
    script = f"""
from wmtp.track import Tracker
t = Tracker({str(tmp_path)!r}, flush_every=1000)
for step in range(1, 6): t.log_metrics({{"loss": 1.0 / step}}, step=step)
print(t.run_id)
"""
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    run_id = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env=env, cwd=tmp_path).stdout.strip().splitlines()[-1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "metrics.jsonl").exists()
