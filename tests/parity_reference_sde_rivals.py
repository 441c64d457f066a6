"""Independent numpy transcriptions of the CPS sampler, GRPO-Guard's loss and Flow-DPPO's masked loss.

Like ``tests/parity_reference.py`` (whose toy denoiser, noises and schedules it reuses), this file never
imports treebench. Each function restates what one reference code base computes; the repository, commit,
file and function are named in its docstring. ``tests/test_parity_sde_rivals.py`` pins the printed numbers
as literals and checks that treebench produces the same ones through its own engine and algorithms.

Re-run after a deliberate change of a transcription (not of treebench) and paste the printed values:

    .venv/bin/python tests/parity_reference_sde_rivals.py
"""

from __future__ import annotations

import math

import numpy as np
from parity_reference import MODEL_A, MODEL_B, _fmt, flow_grpo_step, noise, sd3_scheduler_sigmas

MODEL_A_NEW = -0.56  # the toy denoiser after an update: output = MODEL_A_NEW * x + B t / 1000


def toy(x: np.ndarray, t: float, a: float = MODEL_A) -> np.ndarray:
    return a * x + MODEL_B * (t / 1000.0)


# ---- CPS: yifan123/flow_grpo 3d02fd9d65957d45bc7d0b240ad347a9d334fcb9 -----------------------------------
def cps_step(v, x, sig, i, eta, z=None, prev=None):
    """``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob`` with ``sde_type='cps'``:
    std_dev_t = sigma_prev sin(noise_level pi / 2); x0 = x - sigma v; x1 = x + v (1 - sigma);
    mean = x0 (1 - sigma_prev) + x1 sqrt(sigma_prev^2 - std_dev_t^2); prev = mean + std_dev_t z;
    log_prob = -(prev - mean)^2 ("remove all constants"), mean over all but the batch dim.
    Returns (prev, log_prob, mean, std_dev_t)."""
    s, sp = float(sig[i]), float(sig[i + 1])
    std = sp * math.sin(eta * math.pi / 2)
    x0 = x - s * v
    x1 = x + v * (1 - s)
    mean = x0 * (1 - sp) + x1 * math.sqrt(sp**2 - std**2)
    if prev is None:
        prev = mean + std * z
    lp = -((prev - mean) ** 2)
    return prev, lp.reshape(lp.shape[0], -1).mean(axis=1), mean, std


def flow_grpo_cps_trajectory(T=6, shift=3.0, eta=0.8, G=2):
    """``sd3_pipeline_with_logprob`` with ``sde_type='cps'`` at every step (Flow-GRPO, noise level 0.8 as in
    the ``*_fast_nocfg`` configs), SD3 scheduler sigmas, timesteps 1000 sigma, i.i.d. initial noises, no
    CFG; the image is the last latent (at the last step sigma_prev = 0: std 0, prev = x0, log-prob 0).
    Also the log-probs of the same transitions re-scored under the toy model with A = MODEL_A_NEW (what
    ``compute_log_prob`` returns after an update). Returns (final, log-probs [G, T], new log-probs [G, T])."""
    sig = sd3_scheduler_sigmas(T, shift)
    x = noise(0, G).astype(np.float64)
    lps, new = [], []
    for i in range(T):
        t = sig[i] * 1000.0
        xin = x
        x, lp, _, _ = cps_step(toy(xin, t), xin, sig, i, eta, z=noise(i + 1, G))
        _, lp_new, _, _ = cps_step(toy(xin, t, MODEL_A_NEW), xin, sig, i, eta, prev=x)
        lps.append(lp)
        new.append(lp_new)
    return x, np.stack(lps, axis=1), np.stack(new, axis=1)


# ---- GRPO-Guard: yifan123/flow_grpo 2e2f712e9feb19246fa0db9527878e2766b5353f ---------------------------
GUARD_ADV = [1.3, -0.8]        # advantages of the two chains (broadcast over their steps)
GUARD_CLIP = 2e-3             # clip range of the guard parity (so that some ratios are clipped)


def flow_step_stats(v, x, sig, i, eta):
    """Flow-GRPO's step mean, std_dev_t (without sqrt(-dt)) and sqrt(-dt) (``return_sqrt_dt=True``)."""
    s, sn = float(sig[i]), float(sig[i + 1])
    dt = sn - s
    den = float(sig[1]) if s == 1.0 else s
    std_dev = math.sqrt(s / (1 - den)) * eta
    mean = x * (1 + std_dev**2 / (2 * s) * dt) + v * (1 + std_dev**2 * (1 - s) / (2 * s)) * dt
    return mean, std_dev, math.sqrt(-dt)


def grpo_guard_terms(T=4, shift=3.0, eta=0.7, G=2, clip_range=GUARD_CLIP, adv_clip_max=5.0):
    """``scripts/train_sd3_GRPO_Guard.py`` with ``config.rationorm = True``: the pipeline stores each step's
    ``prev_sample_mean``; in training, for step j, ``compute_log_prob`` under the updated model (toy A =
    MODEL_A_NEW) gives log_prob, prev_sample_mean, std_dev_t, sqrt_dt and

        sigma_t = std_dev_t.mean(); ratio_mean_bias = mean_dims((mean - mean_old)^2)
        ratio_mean_bias /= 2 (sqrt_dt.mean() sigma_t)^2
        ratio = exp((log_prob - log_prob_old + ratio_mean_bias) (sqrt_dt.mean() sigma_t))
        policy_loss = mean(max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps))) / sqrt_dt.mean()^2

    (all rows of a batch share step j, so the means over the batch are the step's values). The trained
    steps are j < int(T * 0.99). Returns (ratio [G, J], per-row loss terms [G, J]: the summands of the mean,
    already divided by sqrt_dt^2)."""
    sig = sd3_scheduler_sigmas(T, shift)
    x = noise(0, G).astype(np.float64)
    steps = []
    for i in range(T):
        t = sig[i] * 1000.0
        v = toy(x, t)
        nxt, _, lp = flow_grpo_step(v, x, sig, i, eta, noise(i + 1, G))
        mean, _, _ = flow_step_stats(v, x, sig, i, eta)
        steps.append((x, nxt, lp, mean, t))
        x = nxt
    adv = np.clip(np.asarray(GUARD_ADV), -adv_clip_max, adv_clip_max)
    ratios, losses = [], []
    for j in range(int(T * 0.99)):
        xin, nxt, lp_old, mean_old, t = steps[j]
        v_new = toy(xin, t, MODEL_A_NEW)
        mean, std_dev, sqrt_dt = flow_step_stats(v_new, xin, sig, j, eta)
        std = std_dev * sqrt_dt
        lp = (-((nxt - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi)))
        lp = lp.reshape(G, -1).mean(axis=1)
        bias = ((mean - mean_old) ** 2).reshape(G, -1).mean(axis=1) / (2 * (sqrt_dt * std_dev) ** 2)
        ratio = np.exp((lp - lp_old + bias) * (sqrt_dt * std_dev))
        unclipped = -adv * ratio
        clipped = -adv * np.clip(ratio, 1 - clip_range, 1 + clip_range)
        ratios.append(ratio)
        losses.append(np.maximum(unclipped, clipped) / sqrt_dt**2)
    return np.stack(ratios, axis=1), np.stack(losses, axis=1)


# ---- Flow-DPPO: Tencent-Hunyuan/UniRL 1a7b501e8fe8517b432a130220d2ff462f9b5afa ---------------------------
DPPO_ADV = [1.2, -0.7, 0.4, -1.1]   # advantages of the four chains
DPPO_THRESHOLDS = (1e-4, 3e-5)     # KL thresholds of the parity (between the edges' KLs: each masks some)
DPPO_REWARDS = [0.3, 0.9, 0.5, 0.2, 0.6, 0.6, 0.1, 0.8]   # two prompts of four images, contiguous
DPPO_GROUPS = [0, 0, 0, 0, 1, 1, 1, 1]


def unirl_sde_indices(T, frac=(0.0, 0.5), num_sde_steps=2, rollout_id=0):
    """``unirl/utils/scheduler_utils.py::AllSDEScheduler.get_sde_indices(rollout_id)``."""
    pool = list(range(int(T * frac[0]), int(T * frac[1])))
    if num_sde_steps >= len(pool):
        return pool
    rng = np.random.default_rng(rollout_id)
    return sorted(int(i) for i in rng.choice(pool, size=num_sde_steps, replace=False))


def unirl_sigma_t(sig, j, eta):
    """``unirl/algorithms/flowdppo.py::FlowDPPO._compute_sigma_t``:
    sqrt(s / (1 - clamp(s, max=0.99))) eta sqrt(-(s_next - s))."""
    s, sn = float(sig[j]), float(sig[j + 1])
    return math.sqrt(s / (1.0 - min(s, 0.99))) * eta * math.sqrt(-(sn - s))


def flowdppo_terms(T=6, shift=3.0, eta=0.7, G=4, threshold=DPPO_THRESHOLDS[0], add_kl_coefficient=True):
    """UniRL's SD3 rollout (``FlowSDEStrategy`` = Flow-GRPO's step, sigma_max = sigmas[1]) with SDE steps
    ``unirl_sde_indices(T, (0, 0.5), 2, 0)`` and Euler (eta 0) elsewhere; ``FlowDPPO.prepare_segment``
    replays the SDE steps at the pre-update weights (toy A = MODEL_A) for the anchor means; the update
    replays them under toy A = MODEL_A_NEW and ``_flowdppo_kl_adv_loss``:

        ratio = exp(new_logp - old_logp); kl = mean_dims((new_means - old_means)^2 / (2 sigma_t^2))
        keep = kl < threshold; pos_rm = ~keep & ratio > 1 & adv > 0; neg_rm = ~keep & ratio < 1 & adv < 0
        loss_per_elem = where(~(pos_rm | neg_rm), -adv ratio, 0)

    with sigma_t = ``_compute_sigma_t`` (ones when ``add_kl_coefficient`` is False). Chains in root order,
    steps in step order. Returns (sde steps, final latent, ratio [G, S], kl [G, S], masked [G, S],
    loss_per_elem [G, S])."""
    sig = sd3_scheduler_sigmas(T, shift)
    sde = unirl_sde_indices(T)
    x = noise(0, G).astype(np.float64)
    draw = 1
    rec = []
    for i in range(T):
        t = sig[i] * 1000.0
        v = toy(x, t)
        if i in sde:
            nxt, _, lp = flow_grpo_step(v, x, sig, i, eta, noise(draw, G))
            draw += 1
            rec.append((i, x, nxt, lp, t))
            x = nxt
        else:
            x = x + v * (float(sig[i + 1]) - float(sig[i]))
    adv = np.asarray(DPPO_ADV)
    ratio, kl, masked, loss = [], [], [], []
    for j, xin, nxt, lp_old, t in rec:
        old_mean, _, _ = flow_step_stats(toy(xin, t), xin, sig, j, eta)        # prepare_segment's replay
        new_mean, std_dev, sqrt_dt = flow_step_stats(toy(xin, t, MODEL_A_NEW), xin, sig, j, eta)
        std = std_dev * sqrt_dt
        lp = (-((nxt - new_mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
        lp = lp.reshape(G, -1).mean(axis=1)
        r = np.exp(lp - lp_old)
        s_t = unirl_sigma_t(sig, j, eta) if add_kl_coefficient else 1.0
        k = ((new_mean - old_mean) ** 2 / (2 * s_t**2)).reshape(G, -1).mean(axis=1)
        high = ~(k < threshold)
        rm = (high & (r > 1.0) & (adv > 0)) | (high & (r < 1.0) & (adv < 0))
        ratio.append(r)
        kl.append(k)
        masked.append(rm)
        loss.append(np.where(~rm, -adv * r, 0.0))
    def st(v):
        return np.stack(v, axis=1)

    return sde, x, st(ratio), st(kl), st(masked), st(loss)


def unirl_advantages(rewards, groups, use_global_std, eps=1e-8):
    """``unirl/types/rollout_resp.py::RolloutTrack.compute_advantages(normalize=True, use_global_std=...)``
    in float32: per-group mean; std = the unbiased std of all rewards + eps (global), else
    sqrt(population variance of the group + eps)."""
    r = np.asarray(rewards, dtype=np.float32)
    g = np.asarray(groups)
    out = np.zeros_like(r)
    for k in np.unique(g):
        m = g == k
        mean = r[m].mean()
        std = (r.std(ddof=1) + np.float32(eps)) if use_global_std else np.sqrt(r[m].var() + np.float32(eps))
        out[m] = (r[m] - mean) / std
    return out


if __name__ == "__main__":
    fin, lp, lp_new = flow_grpo_cps_trajectory()
    print("CPS final latent", _fmt(fin))
    print("CPS log-probs [G, T]", _fmt(lp))
    print("CPS log-probs under A_NEW [G, T]", _fmt(lp_new))
    ratio, loss = grpo_guard_terms()
    print("GRPO-Guard ratio [G, J]", _fmt(ratio))
    print("GRPO-Guard loss terms [G, J]", _fmt(loss))
    sde, fin, ratio, kl, masked, loss = flowdppo_terms()
    print("Flow-DPPO sde steps", sde)
    print("Flow-DPPO final latent", _fmt(fin))
    print("Flow-DPPO ratio [G, S]", _fmt(ratio))
    print("Flow-DPPO kl [G, S]", _fmt(kl))
    for thr in DPPO_THRESHOLDS:
        *_, masked, loss = flowdppo_terms(threshold=thr)
        print(f"Flow-DPPO threshold {thr}: masked", masked.astype(int).ravel().tolist(), "loss", _fmt(loss))
    _, _, _, kl1, masked1, loss1 = flowdppo_terms(threshold=5e-5, add_kl_coefficient=False)
    print("Flow-DPPO no coefficient, threshold 5e-5: kl", _fmt(kl1), "masked", masked1.astype(int).ravel().tolist(),
          "loss", _fmt(loss1))
    print("UniRL advantages, global std", _fmt(unirl_advantages(DPPO_REWARDS, DPPO_GROUPS, True)))
    print("UniRL advantages, per-group std", _fmt(unirl_advantages(DPPO_REWARDS, DPPO_GROUPS, False)))
