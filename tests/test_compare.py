"""`wmtp compare --quick` end to end, as a user starts it: every algorithm and seed has a row, and the report files are well-formed."""
import json, math

import pytest

from conftest import wmtp_cli


def _wmtp(*args): return wmtp_cli(*args, timeout=900, script=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    res = _wmtp("compare", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_rows_for_every_algorithm_and_seed(quick):
    out, _ = quick
    res = json.loads((out / "compare.json").read_text())
    algos = ["baseline", "critic", "rho1-weighted", "rho1-tokenskip"]
    assert res["algorithms"] == algos and res["seeds"] == [0, 1] and res["quick"] is True
    assert sorted((r["algorithm"], r["seed"]) for r in res["rows"]) == sorted((a, s) for a in algos for s in (0, 1))
    for r in res["rows"]:
        assert len(r["ce_correct"]) == len(r["ce_all"]) == res["model"]["n_future"]
        assert all(math.isfinite(x) and x > 0 for x in r["ce_correct"] + r["ce_all"]), r
        assert r["steps"] == res["optim"]["max_steps"] and r["pass_at_1"] in (0.0, 0.5, 1.0)
        assert r["weight_max"] >= 1.0 - 1e-6 and 0 < r["ess_frac"] <= 1.0 + 1e-6, r
    # bounded weights: rho1-weighted never above its w_max, the critic never above its own
    assert max(r["weight_max"] for r in res["rows"] if r["algorithm"] in ("rho1-weighted", "critic")) <= 3.0 + 1e-4
    assert all(r["weight_max"] == pytest.approx(1.0) for r in res["rows"] if r["algorithm"] == "baseline")
    # Rho-1's reference is a separate run on clean data, one per seed
    assert [x["seed"] for x in res["references"]] == [0, 1] and all(x["steps"] > 0 for x in res["references"])
    crit = [r for r in res["rows"] if r["algorithm"] == "critic"]
    assert all(r["extra_steps"] > 0 and 0 <= r["stage1_auc"] <= 1 for r in crit)
    s = res["summary"]["baseline"]["ce_correct_h0"]
    assert s["n"] == 2 and s["std"] is not None


def test_report_and_plot(quick):
    out, res = quick
    md = (out / "compare.md").read_text()
    assert "wmtp compare --quick" in md and "smoke-scale" in md and "reference" in md
    for a in ("baseline", "critic", "rho1-weighted", "rho1-tokenskip"): assert f"| {a} | " in md
    assert " ± " in md and "ESS" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in res.stdout


def test_bad_input_writes_nothing(tmp_path):
    res = _wmtp("compare", "--quick", "--out", str(tmp_path / "x"), "optim.no_such_key=1")
    assert res.returncode == 2 and "no_such_key" in res.stderr
    assert not (tmp_path / "x").exists()
