"""Independent numpy transcriptions of AWM's and ReFL's reference trainers (and of DRaFT-K's equations).

Like ``tests/parity_reference.py`` (whose fixed inputs and toy denoiser it reuses): this file never
imports treebench. Each function restates what one reference computes, the repository, file and function
named in its docstring; ``tests/test_parity_awm_refl.py`` pins the printed numbers as literals and checks
that treebench's algorithms produce them. Re-run after a deliberate change of a transcription:

    .venv/bin/python tests/parity_reference_awm_refl.py

Gradients are derived by hand (forward-mode chain rule in the toy model's slope A), so the expected
gradient of a loss does not come from the autograd that treebench uses.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_reference import (
    MODEL_A,
    MODEL_A_REF,
    MODEL_B,
    _fmt,
    noise,
    sd3_scheduler_sigmas,
    sd_alphas_cumprod,
)

# ---- fixed inputs shared with tests/test_parity_awm_refl.py ----------------------------------------
MODEL_A_EMA = -0.47                       # the toy EMA-policy denoiser of the AWM parity
AWM_ADVANTAGES = [2.0, -1.0, 0.3, -7.0, 6.5, 0.0]   # one per image, two beyond the clamp at 5
AWM_LEAF_ORDER = [3, 0, 5, 1, 4, 2]                  # the shuffled image order of the update
AWM_U = [[0.10, 0.55, 0.99], [0.50, 0.00, 0.70], [0.95, 0.25, 0.40],
         [0.33, 0.66, 0.05], [0.80, 0.45, 0.15], [0.01, 0.90, 0.60]]  # uniforms of the timestep draw, per image
AWM_T = 10                                           # sampling steps of the AWM parity (SD3 schedule)
AWM_FRACTION = 0.9
REFL_W_SEED = 60                                      # the toy differentiable reward's weights: noise(60, 1)


# ---- AWM (scxue/advantage_weighted_matching, scripts/train_sd3_awm.py at be51372) ------------------------
def awm_time_indices(num_steps, fraction, k, time_type, u):
    """``main``'s ``time_type`` branch: strata boundaries linspace(lo, int(num_steps * fraction), n + 1)
    truncated to integers (lo = 0 for "discrete", 1 otherwise; n = k, or k - 1 for "discrete_with_init",
    which prepends step 0); index = lower + int(u * (upper - lower)). Returns [B, k] ints."""
    u = np.asarray(u, dtype=np.float64)
    hi = int(num_steps * fraction)
    lo, n = (0, k) if time_type == "discrete" else (1, k - 1 if time_type == "discrete_with_init" else k)
    b = np.floor(np.linspace(lo, hi, n + 1)).astype(np.int64)
    idx = b[:-1] + np.floor(u[:, :n] * (b[1:] - b[:-1])).astype(np.int64)
    if time_type == "discrete_with_init":
        idx = np.concatenate([np.zeros((u.shape[0], 1), dtype=np.int64), idx], axis=1)
    return idx


def awm_weight(mse, t, weighting, p=0.25):
    """``compute_log_prob_awm``: log_prob = -mse, then by ``weighting`` ("Uniform", "t", "t**2", "huber",
    "ghuber" in the reference; here uniform, t, t2, huber, ghuber). Returns (w = -log_prob, dw/dmse)."""
    if weighting == "uniform":
        return mse, np.ones_like(mse)
    if weighting == "t":
        return mse * t, t
    if weighting == "t2":
        return mse * t**2, t**2
    if weighting == "huber":  # -(sqrt(-log_prob + 1e-10) - 1e-5) * t
        return (np.sqrt(mse + 1e-10) - 1e-5) * t, 0.5 / np.sqrt(mse + 1e-10) * t
    if weighting == "ghuber":  # -((-log_prob + 1e-10)^p - 1e-10^p) * t / p
        return ((mse + 1e-10) ** p - 1e-10**p) * t / p, (mse + 1e-10) ** (p - 1) * t
    raise ValueError(weighting)


def _velocity_kl(v, xt, t, std2, a_other, how):
    """mean((v - v_other)^2) (/ 2 std^2 for "elbo") and its derivative in A, v_other = a_other x_t + B t."""
    d = v - (a_other * xt + MODEL_B * t)
    div = std2 if how == "elbo" else 1.0
    return np.mean(d**2) / div, np.mean(2 * d * xt) / div


def awm_update(weighting="ghuber", kl_weight="uniform", kl_ema_weight="uniform", time_type="discrete", k=3,
               beta=1e-3, ema_beta=1.0, adv_clip_max=5.0, advantage_max=1.0):
    """The training loop of ``main`` for one epoch on 6 images, on-policy (``off_policy`` False: the old
    log-prob is the same forward, detached, so ratio = 1), ``loss_type`` "exp_first", ``clip_range`` 1:
    x0 = noise(30, 6) (the clean latents), per term j (in AWM_LEAF_ORDER, then the image's k steps) eps_j =
    noise(40 + j, 1), t = sigma of the step (SD3 schedule, T = AWM_T), x_t = (1 - t) x0 + t eps;
    v = A x_t + B t (the toy model at timestep 1000 t), v_ref with A = MODEL_A_REF (adapter disabled),
    v_ema with A = MODEL_A_EMA; advantages clamp(AWM_ADVANTAGES, +-5) / 5 * advantage_max;
    loss = mean_j [max(-a r, -a clip(r)) + beta KL_ref + ema_beta KL_ema], KL = mean((v - v_other)^2)
    ("Uniform") or that / (2 std^2), std = 0.7 sqrt(t / (1 - min(t, 0.99))) ("ELBO").
    Returns (step indices [6, k], per-term loss [M], mean loss, mean KL_ref, mean weighted error w,
    dloss/dA of the mean loss: sum over terms of a_j w'(mse) dmse/dA + beta dKL/dA + ema_beta dKL_ema/dA)."""
    sig = sd3_scheduler_sigmas(AWM_T)
    steps = awm_time_indices(AWM_T, AWM_FRACTION, k, time_type, AWM_U)
    x0_all = noise(30, 6).astype(np.float64)
    adv = np.clip(np.array(AWM_ADVANTAGES), -adv_clip_max, adv_clip_max) / adv_clip_max * advantage_max
    terms, kls, ws, grads = [], [], [], []
    j = 0
    for leaf in AWM_LEAF_ORDER:
        for s in steps[leaf]:
            t = sig[s]
            x0 = x0_all[leaf]
            eps = noise(40 + j, 1).astype(np.float64)[0]
            xt = (1 - t) * x0 + t * eps
            v = MODEL_A * xt + MODEL_B * t
            target = eps - x0
            mse = np.mean((v - target) ** 2)
            w, dw = awm_weight(mse, t, weighting)
            dmse = np.mean(2 * (v - target) * xt)
            std2 = 2 * (math.sqrt(t / (1 - min(t, 0.99))) * 0.7) ** 2

            k_ref, dk_ref = _velocity_kl(v, xt, t, std2, MODEL_A_REF, kl_weight)
            k_ema, dk_ema = _velocity_kl(v, xt, t, std2, MODEL_A_EMA, kl_ema_weight)
            a = adv[leaf]
            terms.append(-a + beta * k_ref + ema_beta * k_ema)  # ratio 1: the policy term's value is -a
            grads.append(a * dw * dmse + beta * dk_ref + ema_beta * dk_ema)
            kls.append(k_ref)
            ws.append(w)
            j += 1
    terms = np.array(terms)
    return steps, terms, terms.mean(), np.mean(kls), np.mean(ws), np.mean(grads)


def awm_ema_after_one_step(a_new, kl_ema_decay=0.3):
    """End of ``main``'s epoch, ``kl_ema_decay_type`` "linear": decay = min(kl_ema_decay, 0.001 global_step)
    with global_step = 1 after the first optimizer step; ema <- decay ema + (1 - decay) theta."""
    d = min(kl_ema_decay, 0.001 * 1)
    return d * MODEL_A_EMA + (1 - d) * a_new


# ---- ReFL (THUDM/ImageReward, ImageReward/ReFL.py at c1392c6) --------------------------------------------
def ddpm_step(x, eps, t, prev_t, alphas):
    """diffusers ``DDPMScheduler.step`` (epsilon prediction, variance "fixed_small", no clipping), the
    ancestral step of ReFL's no-grad loop: x0 = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t); beta_t = 1 - ab_t /
    ab_prev; mean = sqrt(ab_prev) beta_t / (1 - ab_t) x0 + sqrt(ab_t / ab_prev) (1 - ab_prev) / (1 - ab_t) x;
    std = sqrt((1 - ab_prev) / (1 - ab_t) beta_t). Returns (mean, std)."""
    ab, abp = alphas[t], (alphas[prev_t] if prev_t >= 0 else 1.0)
    beta = 1 - ab / abp
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    mean = math.sqrt(abp) * beta / (1 - ab) * x0 + math.sqrt(ab / abp) * (1 - abp) / (1 - ab) * x
    return mean, math.sqrt(max((1 - abp) / (1 - ab) * beta, 1e-20))


def refl_ddpm_steps(T=40, indices=(0, 10, 25, 38)):
    """DDPMScheduler.set_timesteps(40) on the SD 1.x config (steps_offset 1, "leading"): t_i = 25 (39 - i) + 1,
    prev = t - 25. (mean, std) of the step at each index for x = noise(70, 1), eps = noise(71, 1)."""
    alphas = sd_alphas_cumprod()
    ts = np.arange(T)[::-1] * (1000 // T) + 1
    x = noise(70, 1).astype(np.float64)
    e = noise(71, 1).astype(np.float64)
    means, stds = [], []
    for i in indices:
        m, s = ddpm_step(x, e, int(ts[i]), int(ts[i]) - 1000 // T, alphas)
        means.append(m)
        stds.append(s)
    return np.stack(means), np.array(stds)


REFL_MARGINS = (2.0, -0.9)   # ReFL's margin (every image below it) and one that leaves two images above it
REFL_STOPS = [1, 3, 2, 3]     # the first gradient step m of each image (images 0..3 in training order 2, 0, 3, 1)
REFL_ORDER = [2, 0, 3, 1]


def refl_epsilon(T=4, margin=2.0, scale=1e-3):
    """``Trainer.train`` of ReFL.py after the no-grad loop: from the latent after m steps (here x_m =
    noise(50 + m, 4)[image], the stored rollout latents), eps = unet(x_m, t_m) (the toy epsilon model
    A x + B t_m / 1000 on the DDIM/DDPM grid t_i = (1000 / T)(T - 1 - i) + 1), pred_original_sample =
    (x - sqrt(1 - ab) eps) / sqrt(ab), image = (x0 / 2 + 0.5).clamp(0, 1) (the identity "VAE"), reward r =
    sum(W image) (W = noise(REFL_W_SEED, 1)), loss = mean(relu(margin - r)) * scale.
    Returns (r [4] in training order, loss, dloss/dA)."""
    alphas = sd_alphas_cumprod()
    ts = np.arange(T)[::-1] * (1000 // T) + 1
    W = noise(REFL_W_SEED, 1).astype(np.float64)[0]
    rs, grad = [], 0.0
    for img, m in zip(REFL_ORDER, REFL_STOPS):
        x = noise(50 + m, 4).astype(np.float64)[img]
        t = int(ts[m])
        ab = alphas[t]
        eps = MODEL_A * x + MODEL_B * t / 1000.0
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        dx0 = -math.sqrt(1 - ab) / math.sqrt(ab) * x  # d eps / dA = x
        pre = x0 / 2 + 0.5
        image = np.clip(pre, 0, 1)
        dimage = np.where((pre > 0) & (pre < 1), 0.5 * dx0, 0.0)
        r = float(np.sum(W * image))
        rs.append(r)
        if r < margin:
            grad += -scale * float(np.sum(W * dimage))
    rs = np.array(rs)
    return rs, float(np.mean(np.maximum(margin - rs, 0) * scale)), grad / len(rs)


# ---- DRaFT-K (arXiv 2309.17400, Alg. 1 with truncated backpropagation: paper equations) ------------------
def draft_flow(T=4, K=2, scale=1.0):
    """DRaFT-K on a flow model: from the latent after T - K deterministic steps (x = noise(50 + T - K, 4)),
    K - 1 Euler steps x <- x + (sigma_{i+1} - sigma_i) v(x, sigma_i) with gradients, then the data
    prediction x0 = x - sigma v of the last evaluation (for K steps ending at T - 1 this is the last Euler
    step's result), image = (x0 + 1) / 2 clamped, r = sum(W image), loss = -r * scale, mean over images.
    Toy model v = A x + B sigma. Returns (r [4] in REFL_ORDER, loss, dloss/dA)."""
    sig = sd3_scheduler_sigmas(T)
    W = noise(REFL_W_SEED, 1).astype(np.float64)[0]
    rs, grad = [], 0.0
    for img in REFL_ORDER:
        x = noise(50 + T - K, 4).astype(np.float64)[img]
        dx = np.zeros_like(x)
        for j in range(K):
            s, sn = sig[T - K + j], sig[T - K + j + 1]
            v = MODEL_A * x + MODEL_B * s
            dv = x + MODEL_A * dx
            if j < K - 1:
                x, dx = x + (sn - s) * v, dx + (sn - s) * dv
            else:
                x, dx = x - s * v, dx - s * dv
        pre = (x + 1) / 2
        image = np.clip(pre, 0, 1)
        dimage = np.where((pre > 0) & (pre < 1), 0.5 * dx, 0.0)
        rs.append(float(np.sum(W * image)))
        grad += -scale * float(np.sum(W * dimage))
    rs = np.array(rs)
    return rs, float(np.mean(-rs * scale)), grad / len(rs)


AWM_CASES = [("ghuber", "uniform", "uniform", "discrete"), ("uniform", "elbo", "uniform", "discrete_wo_init"),
             ("huber", "uniform", "elbo", "discrete_with_init"), ("t2", "elbo", "elbo", "discrete")]

if __name__ == "__main__":
    for tt in ("discrete", "discrete_wo_init", "discrete_with_init"):
        print(f"AWM steps T=14 f=0.9 k=6 {tt}", awm_time_indices(14, 0.9, 6, tt, [[0.10, 0.55, 0.99, 0.50, 0.00, 0.70],
                                                                                [0.95, 0.25, 0.40, 0.33, 0.66, 0.05]]).tolist())
    for case in AWM_CASES:
        w, kw, kew, tt = case
        steps, terms, loss, kl, wm, g = awm_update(w, kw, kew, tt)
        print(f"AWM {case}: steps", steps.tolist())
        print("  terms", _fmt(terms))
        print("  loss, kl_ref, mean w, dloss/dA", _fmt([loss, kl, wm, g]))
        print("  ema after one SGD(lr=1) step", _fmt([awm_ema_after_one_step(MODEL_A - g)]))
    m, s = refl_ddpm_steps()
    print("DDPM step means", _fmt(m))
    print("DDPM step stds", _fmt(s))
    for margin in REFL_MARGINS:
        r, loss, g = refl_epsilon(margin=margin)
        print(f"ReFL epsilon margin {margin}: r", _fmt(r), "loss, dloss/dA", _fmt([loss, g]))
    for K in (1, 2):
        r, loss, g = draft_flow(K=K)
        print(f"DRaFT-{K} flow: r", _fmt(r), "loss, dloss/dA", _fmt([loss, g]))
