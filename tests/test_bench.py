"""`wmtp bench --quick` end to end, as a user starts it: the report files exist and are well-formed."""
import json, math

import pytest
import torch

from conftest import wmtp_cli


def _wmtp(*args): return wmtp_cli(*args, timeout=900, script=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = _wmtp("bench", "--quick", "--threads", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_has_every_row_with_sane_ratios(quick):
    out, _ = quick
    res = json.loads((out / "bench.json").read_text())
    assert res["meta"]["quick"] is True and res["meta"]["devices"][0] == "cpu"
    assert res["meta"]["commit"] and len(res["meta"]["commit"].split("+")[0]) >= 7  # the report names the code it came from (a git checkout here)
    assert res["errors"] == []
    loss = res["loss_paths"]
    for V in (32768, 131072):
        assert {r["path"] for r in loss if r["device"] == "cpu" and r["V"] == V} >= {"flatten", "per_head", "fused"}
    for r in loss:
        assert _finite_positive(r["time_s"]) and _finite_positive(r["x_time"]) and _finite_positive(r["x_less_memory"]), r
        assert math.isfinite(r["loss"]) and r["extra_peak_mb"] >= 0
    assert [b["backend"] for b in res["backends"]] == ["cpu", "cuda", "mps"]
    assert res["backends"][0]["status"] == "measured" and res["backends"][0]["speedup_vs_cpu"] == 1.0
    for b in res["backends"][1:]:
        if b["status"] == "measured": assert _finite_positive(b["speedup_vs_cpu"])
        else: assert b["time_s"] is None and b["status"] in ("not available", "not selected (--device)")
    assert res["compile"][0]["status"].startswith("skipped") and res["compile"][0]["speedup"] is None
    assert all(_finite_positive(h["ratio"]) for h in res["heads"]) and res["heads"][0]["trunk_layers"] == 2
    assert [w["weighter"] for w in res["weighters"] if w["device"] == "cpu"] == ["baseline", "critic-s1", "critic-s2", "rho1-weighted", "rho1-tokenskip"]
    assert all(_finite_positive(w["x_baseline"]) for w in res["weighters"])
    assert [(h["heads"], h["trunk_layers"]) for h in res["heads"]] == [("parallel", 2), ("sequential", 2), ("mlp", 2)]
    assert all(_finite_positive(h["bound"]) and h["bound"] > 1 and math.isfinite(h["gap"]) for h in res["heads"])
    assert [d["heads"] for d in res["decoding"]] == ["parallel", "sequential", "mlp"]
    for dec in res["decoding"]:
        assert dec["identical"] is True and 1.0 <= dec["tokens_per_forward"] <= 4.0
        assert _finite_positive(dec["greedy_tok_s"]) and _finite_positive(dec["speculative_tok_s"]) and _finite_positive(dec["speedup"])
        assert _finite_positive(dec["pass_floor"]) and _finite_positive(dec["verify_cost"])
    spec = [r for r in res["real_code"] if r["method"].startswith("wmtp speculative")]
    assert spec and all(r["identical"] and _finite_positive(r["pass_floor"]) for r in spec)


def test_targets_each_have_a_verdict(quick):
    out, _ = quick
    res = json.loads((out / "bench.json").read_text())
    names = [t["target"] for t in res["targets"]]
    for expected in ("fused vs flatten extra peak memory (cpu fp32, V=32768)", "fused vs flatten time (cpu fp32, V=131072)",
                     "mps vs cpu training step", "torch.compile training step (cpu)",
                     *(f"H=4 vs H=1 training step (cpu, {h} heads, 2-block trunk)" for h in ("parallel", "sequential", "mlp")),
                     *(f"self-speculative vs greedy tokens/s (cpu, {h} heads)" for h in ("parallel", "sequential", "mlp")),
                     "self-speculative vs greedy tokens/s, best layout (cpu)",
                     "pretrained H=4 fused vs transformers' H=1 extra peak memory (cpu, V=4096, S=64)"):
        assert expected in names
    by = {t["target"]: t for t in res["targets"]}
    assert by["torch.compile training step (cpu)"]["met"] is None  # skipped in --quick: n/a, not "yes"
    if not torch.backends.mps.is_available(): assert by["mps vs cpu training step"]["measured"] == "not available"
    assert all(t["met"] in (True, False, None) for t in res["targets"])


def test_markdown_report_is_printed_and_written(quick):
    out, res = quick
    md = (out / "bench.md").read_text()
    assert res.stdout.strip() == md.strip()  # stdout is the report; progress goes to stderr
    assert "| target | measured | goal | met |" in md
    for section in ("## Loss paths", "### Backends", "### torch.compile", "### Heads", "### Weighters", "## Decoding"):
        assert section in md
    section = md.split("## Targets")[1].split("\n## ")[0]
    rows = [l for l in section.splitlines() if l.startswith("|")]
    assert len(rows) == 2 + len(json.loads((out / "bench.json").read_text())["targets"])
    assert all(l.count("|") == 5 for l in rows)  # a rectangular 4-column table
    json_targets = json.loads((out / "bench.json").read_text())["targets"]
    for t in json_targets:
        verdict = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        assert f"| {t['target']} | {t['measured']} | {t['goal']} | {verdict} |" in md


def test_plots_are_png(quick):
    out, _ = quick
    for name in ("loss_paths.png", "decoding.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_unavailable_device_is_a_clear_error(tmp_path):
    if torch.cuda.is_available(): pytest.skip("CUDA is present")
    res = _wmtp("bench", "--device", "cuda", "--out", str(tmp_path))
    assert res.returncode == 2 and "CUDA is not available on this machine" in res.stderr
    bad = _wmtp("bench", "--device", "tpu")
    assert bad.returncode == 2 and "invalid choice: 'tpu'" in bad.stderr
