"""``python -m bench.cost.perf paper-table`` on a tiny stand-in (the GPU run uses sd3.5-medium-random)."""

from __future__ import annotations

import json

from bench.cost import perf

SMALL = {"dancegrpo": {"algo.group_size": 3}, "mixgrpo": {"algo.group_size": 3, "algo.window": 2},
         "treegrpo": {"algo.k": 2, "algo.d": 2}}


def test_paper_table_quick_on_tiny_model(tmp_path):
    res = perf.paper_table("tiny-random", prompts=1, iterations=1, warmup=0, device="cpu",
                           overrides={"sampler.steps": 4}, algo_overrides=SMALL)
    rows = res["results"]
    assert list(rows) == ["dancegrpo", "mixgrpo", "treegrpo"]
    for algo, r in rows.items():
        assert "error" not in r, r
        assert r["s_per_iter"] > 0 and r["iterations_timed"] == 1
        assert abs(sum(r[f"{p}_s"] for p in perf.PHASE_KEYS) - r["s_per_iter"]) < 1e-9
        assert r["settings"]["sampler.guidance"] == 4.5 and r["settings"]["sampler.steps"] == 4
        assert r["paper_s_per_iter"] == perf.PAPER_S_PER_ITER[algo]
    # NFE at the paper setting (CFG doubles): DanceGRPO G chains x T steps; trains int(0.6 (T-1)) steps each
    assert rows["dancegrpo"]["nfe_rollout"] == 3 * 4 * 2 and rows["dancegrpo"]["nfe_update"] == 3 * 1 * 2
    assert rows["mixgrpo"]["nfe_rollout"] == 3 * 4 * 2 and rows["mixgrpo"]["nfe_update"] == 3 * 2 * 2
    assert rows["treegrpo"]["images"] == 4 and rows["treegrpo"]["nfe_update"] == (1 + 2) * 2  # one eval per parent
    assert rows["dancegrpo"]["ratio_to_dancegrpo"] == 1.0
    assert abs(rows["treegrpo"]["paper_ratio_to_dancegrpo"] - 72.0 / 184.0) < 1e-12
    table = perf.format_paper_table(res)
    assert "treegrpo" in table.splitlines()[-1] and "x Dance" in table
    json.dumps(res)  # serialisable


def test_paper_table_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc = perf.main(["paper-table", "--model", "tiny-random", "--quick", "--algos", "dancegrpo", "--warmup", "0",
                    "--set", "sampler.steps=3", "--set", "algo.group_size=2", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["results"]["dancegrpo"]["nfe_rollout"] == 2 * 3 * 2
    assert "wrote" in capsys.readouterr().out
