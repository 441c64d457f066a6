"""How often the report's difference interval covers the truth at 3-10 seeds: a simulation under a
realistic generative model, run by a test (tests/test_reports_inference.py) with a fixed RNG seed."""

from __future__ import annotations

import numpy as np

from reports.inference import ALPHA, prompt_welch_arrays
from reports.tdist import t_ppf


def simulate_gains(rng: np.random.Generator, reps: int, n_seeds: int, prompts: int, images: int,
                   effect: float, seed_sd: float, interaction_sd: float, run_prompt_sd: float,
                   image_sd: float, shared_prompt_sd: float, shared_image_sd: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed per-prompt mean gains [reps, n, P] of a method and a baseline under the generative model

        y[m, s, p, j] = mu_m + a_p + c_pj + delta_mp + u_ms + w_msp + e_mspj

    a_p, c_pj: prompt and image (noise draw) effects every run shares; delta_mp: method x prompt
    interaction (mean 0 over the prompt population); u_ms: seed effect; w_msp, e_mspj: run-specific prompt
    and image noise. A fresh prompt sample is drawn in every replicate: the estimand mu_x - mu_b is a
    statement about the prompt population, not these P prompts."""
    shape_p, shape_pj = (reps, 1, prompts), (reps, 1, prompts, images)
    shared = rng.normal(0, shared_prompt_sd, shape_p)[..., None] + rng.normal(0, shared_image_sd, shape_pj)
    out = []
    for mu in (effect, 0.0):
        y = (mu + shared + rng.normal(0, interaction_sd, shape_p)[..., None]
             + rng.normal(0, seed_sd, (reps, n_seeds, 1, 1))
             + rng.normal(0, run_prompt_sd, (reps, n_seeds, prompts, 1))
             + rng.normal(0, image_sd, (reps, n_seeds, prompts, images)))
        out.append(y.mean(axis=-1))
    return out[0], out[1]


#: A realistic model of the shapes world at the canonical settings (32 prompts x 4 images): per-seed
#: gains spread about 0.003 (the issue's seed-spread MDE of 0.002-0.006 at n = 5), prompt effects of
#: about 0.1 and image effects of 0.15 that every run shares (the iteration-0 std of shapes_pref is
#: 0.147), a method x prompt interaction of 0.01, and run-specific noise of 0.01 per prompt and 0.03 per
#: image.
REALISTIC = {"prompts": 32, "images": 4, "effect": 0.009, "seed_sd": 0.003, "interaction_sd": 0.01,
             "run_prompt_sd": 0.01, "image_sd": 0.03, "shared_prompt_sd": 0.1, "shared_image_sd": 0.15}


def coverage_simulation(n_seeds: int, reps: int = 2000, seed: int = 0, conf: float = 1 - ALPHA,
                        prompt_term: bool = True, **model: float) -> float:
    """Fraction of ``reps`` simulated comparisons (n_seeds a side; :data:`REALISTIC` unless overridden
    by ``model``) whose ``conf`` difference interval (:func:`prompt_welch_arrays`, as the report computes
    it) covers the true difference. Fixed RNG ``seed``."""
    m = {**REALISTIC, **model}
    prompts, images = int(m.pop("prompts")), int(m.pop("images"))
    rng = np.random.default_rng(seed)
    zx, zb = simulate_gains(rng, reps, n_seeds, prompts, images, **m)
    est, se, df, _ = prompt_welch_arrays(zx, zb, prompt_term)
    q = t_ppf((1 + conf) / 2, df)
    return float(np.mean(np.abs(est - m["effect"]) <= q * se))
