"""Golden trajectories: each algorithm's first 2 iterations on the tiny models must reproduce the numbers
stored in tests/golden.json (regenerate deliberately with ``python tests/golden.py --regenerate``)."""

from __future__ import annotations

import json

import pytest
from golden import CASES, GOLDEN, differences, run_case


def test_golden_file_covers_every_case():
    stored = json.loads(GOLDEN.read_text())["cases"]
    assert sorted(stored) == sorted(CASES), "regenerate tests/golden.json: python tests/golden.py --regenerate"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_trajectory(tmp_path, name):
    golden = json.loads(GOLDEN.read_text())["cases"][name]
    got = run_case(name, tmp_path)
    bad = differences(golden, got)
    assert not bad, (f"{name}: numerics changed ({'; '.join(bad)}). If intended, run "
                     f"`python tests/golden.py --regenerate` and commit tests/golden.json with the change.")


def test_differences_detects_a_change():
    rec = {"reward_mean": 0.5, "reward_std": 0.1, "loss": -1e-5, "approx_kl": 3e-9,
           "grad_norm": 0.2, "first_ratio": 1.0, "nfe_rollout": 40, "nfe_update": 20, "edges": 10,
           "optimizer_steps": 2}
    assert differences([rec], [dict(rec)]) == []
    assert differences([rec], [dict(rec, grad_norm=0.2002)]) == []  # within rtol 1e-3
    assert differences([rec], [dict(rec, grad_norm=0.21)])
    assert differences([rec], [dict(rec, nfe_update=21)])
    assert differences([rec], [dict(rec, loss=-1.5e-5)])
    assert differences([rec], [dict(rec, approx_kl=4e-9)])
    assert differences([rec], [rec, rec])
    free = dict(rec, approx_kl=None, first_ratio=None)  # likelihood-free: no ratio, logged as null
    assert differences([free], [dict(free)]) == []
    assert differences([free], [rec]) and differences([rec], [free])
