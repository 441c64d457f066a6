"""Reward hacking judged on the whole curve (issue #28): known-answer curves for the run-time rule
(``bench.rundir.runlog``: what ``bench.run.evaluation`` records at each evaluation) and the report's
judgement (``reports.hacking``)."""

from __future__ import annotations

import math

from bench.rundir.runlog import reward_hacking_flag, standard_error, sustained_fall
from reports.hacking import hacking_table
from reports.load import load
from tests.synthetic_runs import linear_curve, write_run

TR, HO = "eval/shapes_pref", "eval/shapes_attr"
STD, IMAGES = 0.4, 64  # standard error of an eval mean: 0.4 / 8 = 0.05


def records(train: list[float], held: list[float], every: int = 5) -> list[dict]:
    return [{"iteration": every * i, "eval_images": IMAGES, TR: t, f"{TR}/std": STD, HO: h, f"{HO}/std": STD}
            for i, (t, h) in enumerate(zip(train, held))]


def flags_at_each_eval(evals: list[dict]) -> list[bool]:
    """What the run records at evaluation n: the rules applied to the evaluations so far (as
    bench.run.evaluation does), old rule or whole-curve rule."""
    out = []
    for n in range(1, len(evals) + 1):
        seen = evals[:n]
        out.append(reward_hacking_flag(seen, TR, [HO]) or bool(sustained_fall(seen, TR, [HO])))
    return out


def test_standard_error_is_std_over_root_images():
    assert math.isclose(standard_error(records([0.6], [0.8])[0], HO), STD / math.sqrt(IMAGES))
    assert standard_error({"iteration": 0, HO: 0.8}, HO) is None


def test_collapse_to_zero_that_stays_is_flagged_at_every_later_evaluation():
    train = [0.60, 0.62, 0.65, 0.67, 0.68, 0.69, 0.69, 0.70]
    held = [0.80, 0.78, 0.00, 0.00, 0.00, 0.00, 0.00, 0.00]  # collapses at the 3rd evaluation, stays at 0
    evals = records(train, held)
    got = flags_at_each_eval(evals)
    # evaluations 0-1: nothing; 2: the first 0 (one evaluation below is not yet "stays"; the three-point
    # rule sees 0.80 -> 0.78 -> 0.00 falling while training rises, so it fires there); 3 onwards: the
    # score no longer falls (the three-point rule is silent) but stays below iteration 0: flagged
    assert got == [False, False, True, True, True, True, True, True]
    assert [reward_hacking_flag(evals[: n + 1], TR, [HO]) for n in range(len(evals))][3:] == [False] * 5
    assert all(sustained_fall(evals[: n + 1], TR, [HO]) == [HO] for n in range(3, len(evals)))


def test_noisy_flat_curve_is_not_flagged():
    # training reward rises; the held-out score wanders within one standard error (0.05) of its start
    train = [0.60 + 0.01 * i for i in range(10)]
    held = [0.80, 0.77, 0.83, 0.76, 0.79, 0.76, 0.82, 0.78, 0.81, 0.77]  # no 3 in a row falling
    assert flags_at_each_eval(records(train, held)) == [False] * 10


def test_old_last_three_evaluations_case_is_still_flagged():
    # a small strict fall over the last three evaluations, within the resolution of iteration 0
    train = [0.60, 0.61, 0.62, 0.63]
    held = [0.80, 0.80, 0.79, 0.78]
    assert flags_at_each_eval(records(train, held)) == [False, False, False, True]
    assert sustained_fall(records(train, held), TR, [HO]) == []


def test_no_flag_when_training_reward_did_not_rise_or_no_iteration_zero():
    held = [0.80, 0.00, 0.00, 0.00]
    assert sustained_fall(records([0.60, 0.60, 0.61, 0.60], held), TR, [HO]) == []  # within resolution
    late = records([0.60, 0.70, 0.75, 0.80], held)[1:]  # first evaluation is not iteration 0
    assert sustained_fall(late, TR, [HO]) == []


def test_collapse_that_drags_the_training_reward_back_is_still_flagged():
    """TreeGRPO k=2 d=1, seed 0, of the shipped k x d grid (docs/results/runs/kd, evals.jsonl, rounded): the
    training reward rises to 0.671, the held-out checker collapses to 0 and stays, and the training reward
    then falls back to its start. The old condition (training reward above its start at the newest
    evaluation) let this run go unflagged; it learned its reward and then lost the held-out metric."""
    train = [0.638, 0.646, 0.641, 0.646, 0.653, 0.663, 0.671, 0.651, 0.637]
    held = [0.799, 0.789, 0.787, 0.467, 0.000, 0.000, 0.000, 0.000, 0.000]
    # its iteration-0 standard deviations over 128 images: resolutions 0.148 / sqrt(128) = 0.013 (training
    # reward) and 0.190 / sqrt(128) = 0.017 (held-out)
    evals = [{**r, "eval_images": 128, f"{TR}/std": 0.148, f"{HO}/std": 0.190} for r in records(train, held)]
    assert sustained_fall(evals, TR, [HO]) == [HO]
    assert not reward_hacking_flag(evals, TR, [HO])  # the three-point rule is silent at the end


def test_dip_that_recovers_is_not_flagged_at_the_end():
    evals = records([0.60, 0.65, 0.70, 0.75, 0.80], [0.80, 0.60, 0.55, 0.79, 0.81])
    assert sustained_fall(evals[:3], TR, [HO]) == [HO]    # while it stays below: flagged
    assert sustained_fall(evals, TR, [HO]) == []          # recovered


def test_report_flags_a_collapse_that_stays_and_says_since_when(tmp_path):
    def collapse(j):  # evaluations every 2 iterations: 0 from iteration 4 on
        return 0.8 if j < 4 else 0.0

    for s in range(3):
        write_run(tmp_path / "hack" / f"seed{s}", algo="dancegrpo", seed=s, heldout_curve=collapse)
        # flat held-out curve (alternating within the resolution 0.05 / sqrt(32) = 0.0088)
        write_run(tmp_path / "flat" / f"seed{s}", algo="dancegrpo", seed=s,
                  heldout_curve=lambda j: 0.8 + (0.004 if (j // 2) % 2 else -0.004))
    row = hacking_table(load([tmp_path / "hack"])).iloc[0]
    assert row["flagged"] and row["seeds_below_start"] == 3 and row["seeds_with_pattern"] == 3
    assert "staying there since iteration 4, 4, 4" in row["text"]
    flat = hacking_table(load([tmp_path / "flat"])).iloc[0]
    assert not flat["flagged"] and flat["seeds_below_start"] == 0
    # the final-versus-iteration-0 rule alone is unchanged: a steady fall in every seed is flagged
    for s in range(2):
        write_run(tmp_path / "fall" / f"seed{s}", algo="ddpo", seed=s, heldout_curve=linear_curve(0.2, -0.01))
    assert hacking_table(load([tmp_path / "fall"])).iloc[0]["flagged"]
