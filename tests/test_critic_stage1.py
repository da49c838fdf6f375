"""The critic's stage 1 with the default critic recipe on the built-in tasks, seeds 0-2 (slow): held-out AUC >= 0.70 on >= 150
fresh programs for every seed, above the template baseline on the mean, and a value MSE below the base rate's.
Prints the table that the README quotes (about 4 minutes per seed on one CPU core)."""
import json, statistics, subprocess, sys

import pytest

from conftest import ROOT, subprocess_env

SEEDS = (0, 1, 2)


def _run(out, seed):
    cmd = [sys.executable, "-m", "wmtp.cli", "train", "--recipe", "critic", "--out", str(out), f"seed={seed}", "max_steps=20",
           "tracking.enabled=false", "tracking.log_every=5", "checkpoints.save_interval=0", "checkpoints.save_final=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.mark.slow
def test_default_critic_learns(tmp_path):
    rows = []
    for s in SEEDS:
        info = _run(tmp_path / f"seed{s}", s)
        st = info["critic_stage1"]
        rows.append({"seed": s, **st, "adv_corr": info["weight_stats"]["weights/adv_corr"]["mean"]})
    lines = ["| seed | held-out AUC | template AUC | n_valid | value MSE | base-rate MSE | held-out family AUC (n) | adv. corr. (stage 2) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['valid_auc']:.3f} | {r['prior_auc']:.3f} | {r['n_valid']} | {r['value_mse']:.4f} | "
              f"{r['base_rate_mse']:.4f} | {r.get('family_auc', float('nan')):.3f} ({', '.join(r.get('heldout_families', []))}, "
              f"{r.get('n_family', 0)}) | {r['adv_corr']:.3f} |" for r in rows]
    mean = lambda k: statistics.fmean(r[k] for r in rows)
    lines.append(f"| mean | {mean('valid_auc'):.3f} | {mean('prior_auc'):.3f} | | {mean('value_mse'):.4f} | {mean('base_rate_mse'):.4f} | "
                 f"{mean('family_auc'):.3f} | {mean('adv_corr'):.3f} |")
    print("\n".join(lines))
    assert all(r["n_valid"] >= 150 for r in rows), rows
    assert all(r["valid_auc"] >= 0.70 for r in rows), lines
    assert mean("valid_auc") > mean("prior_auc"), lines
    assert mean("value_mse") < mean("base_rate_mse"), lines
