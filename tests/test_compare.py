"""`wmtp compare --quick` end to end, as a user starts it: stopped with kill -9 and resumed, every row and seed has its
per-task results, the paired differences agree with a hand computation, and the report files are well-formed."""
import json, math, sys

import pytest

from conftest import wmtp_cli, kill_once_written, subprocess_env

ROWS = ["ntp", "baseline", "critic", "rho1-weighted", "rho1-tokenskip", "oracle"]


def _wmtp(*args): return wmtp_cli(*args, timeout=1200, script=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    first = out / "runs" / "seed0" / "ntp" / "result.json"
    # a first start is killed once a job has finished (in-process jobs: nothing is left running), then resumed
    kill_once_written([sys.executable, "-m", "wmtp.cli", "compare", "--quick", "--out", str(out)], first, env=subprocess_env())
    kept = first.read_text()
    res = _wmtp("compare", "--quick", "--jobs", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res, kept


def test_resume_keeps_finished_jobs(quick):
    out, res, kept = quick
    assert "resuming:" in res.stdout and "jobs are done" in res.stdout
    assert "min left)" in res.stdout  # progress: the time the jobs still to train will take, from this call's pace
    assert (out / "runs" / "seed0" / "ntp" / "result.json").read_text() == kept  # read back, not trained again


def test_rows_for_every_seed_and_share(quick):
    out, _, _ = quick
    res = json.loads((out / "compare.json").read_text())
    assert res["row_names"] == ROWS and res["seeds"] == [0, 1] and res["quick"] is True and res["fracs"] == [None, 0.3]
    key = lambda t: (t[0], t[1], -1 if t[2] is None else t[2])
    got = sorted(((r["row"], r["seed"], r["frac"]) for r in res["rows"]), key=key)
    want = sorted([(a, s, None) for a in ROWS for s in (0, 1)] + [(a, s, 0.3) for a in ROWS if a != "oracle" for s in (0, 1)], key=key)
    assert got == want
    T, n = res["eval"]["tasks"], res["eval"]["n_samples"]
    assert T == 8 and n == 5
    for r in res["rows"]:
        heads = 1 if r["row"] == "ntp" else res["model"]["n_future"]
        assert len(r["ce_correct"]) == len(r["ce_all"]) == heads
        assert all(math.isfinite(x) and x > 0 for x in r["ce_correct"] + r["ce_all"] + [r["ce_constants"]]), r
        assert len(r["greedy"]) == len(r["sampled"]) == T and set(r["greedy"]) <= {0, 1} and all(0 <= c <= n for c in r["sampled"])
        assert r["pass_at_1"] == pytest.approx(sum(r["greedy"]) / T) and sorted(r["pass_at_k"]) == ["1", "5"]
        assert r["references_fit"] == T and 0 < r["constant_tokens"] < r["completion_tokens"]
    by = {(r["row"], r["seed"], r["frac"]): r for r in res["rows"]}
    # the oracle sees only correct programs, each more often; the lower share keeps every correct program
    for s in (0, 1):
        o, b, b3 = by[("oracle", s, None)], by[("baseline", s, None)], by[("baseline", s, 0.3)]
        assert o["incorrect_share"] == 0 and o["epochs"] > b["epochs"] and b3["incorrect_share"] == pytest.approx(0.3, abs=0.02)
        assert b3["train_correct"] == b["train_correct"] and len(o["curve"]) >= 8 and len(b["curve"]) >= 8
        assert by[("critic", s, None)]["lm_steps"] > 0 and by[("critic", s, None)]["steps"] == b["steps"]


def test_paired_differences_by_hand(quick):
    out, _, _ = quick
    res = json.loads((out / "compare.json").read_text())
    by = {(r["row"], r["seed"], r["frac"]): r for r in res["rows"]}
    for name, row in (("oracle", "oracle"), ("critic", "critic"), ("ntp", "ntp")):
        d = res["paired"][name]
        diffs = [a - b for s in (0, 1) for a, b in zip(by[(row, s, None)]["greedy"], by[("baseline", s, None)]["greedy"])]
        assert d["pass_at_1"]["diff"] == pytest.approx(sum(diffs) / len(diffs))
        assert d["pass_at_1"]["lo"] <= d["pass_at_1"]["diff"] <= d["pass_at_1"]["hi"]
        assert d["pass_at_1"]["excludes_zero"] == (d["pass_at_1"]["lo"] > 0 or d["pass_at_1"]["hi"] < 0)
        p5 = lambda c: 1.0 if 5 - c < 5 and c > 0 else 0.0  # n = k = 5: pass@5 is 1 when any sample passed
        hand = [p5(a) - p5(b) for s in (0, 1) for a, b in zip(by[(row, s, None)]["sampled"], by[("baseline", s, None)]["sampled"])]
        assert d["sampled_pass_at_5"]["diff"] == pytest.approx(sum(hand) / len(hand))
    assert "oracle vs baseline @ 0.3" in res["paired"] and all(f"{a} @ 0.3" in res["paired"] for a in ROWS if a not in ("oracle", "baseline"))


def test_report_and_plot(quick):
    out, res, _ = quick
    md = (out / "compare.md").read_text()
    assert "wmtp compare --quick" in md and "smoke-scale" in md
    assert "### All training records" in md and "### Incorrect programs dropped to a share of 0.3" in md
    for a in ROWS: assert f"| {a} | " in md
    assert "| baseline @ 0.3 | " in md and "Paired differences" in md and "Is the weighting aimed" in md
    assert md.count("no difference shown") + md.count("(higher)") + md.count("(lower)") >= 2 * 7
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in res.stdout


def test_bad_input_writes_nothing(tmp_path):
    res = _wmtp("compare", "--quick", "--out", str(tmp_path / "x"), "optim.no_such_key=1")
    assert res.returncode == 2 and "no_such_key" in res.stderr
    res = _wmtp("compare", "--quick", "--out", str(tmp_path / "x"), "--incorrect-frac", "all", "1.5")
    assert res.returncode == 2 and "[0, 1)" in res.stderr
    assert not (tmp_path / "x").exists()


def test_resume_with_other_settings_is_refused(quick, tmp_path):
    out, _, _ = quick
    before = (out / "setting.json").read_text()
    res = _wmtp("compare", "--quick", "--out", str(out), "--samples", "3")
    assert res.returncode == 2 and "other settings" in res.stderr and (out / "setting.json").read_text() == before
