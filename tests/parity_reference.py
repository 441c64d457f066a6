"""Independent transcriptions of the reference trainers' numerics, in plain numpy.

This file never imports treebench. Each function restates, in our own words, what one reference code
base computes (the repository, file and function are named in its docstring). ``tests/test_parity.py``
pins the numbers these functions print as literals and checks that treebench produces the same ones.

Re-run after a deliberate change of a transcription (not of treebench) and paste the printed values
into tests/test_parity.py:

    .venv/bin/python tests/parity_reference.py

The tiny fixed inputs (initial noises, SDE noises, toy denoiser coefficients) are defined here and
imported by the test so both sides see the same inputs.
"""

from __future__ import annotations

import math

import numpy as np

# ---- fixed inputs shared with tests/test_parity.py ------------------------------------------------
LATENT = (1, 2, 2)          # C, h, w of the toy latent
MODEL_A, MODEL_B = -0.5, 0.2  # toy denoiser: output = A * x + B * (timestep / 1000), elementwise


def noise(k: int, rows: int) -> np.ndarray:
    """The k-th noise tensor the sampler draws ([rows, *LATENT]): a fixed, irregular pattern."""
    n = rows * int(np.prod(LATENT))
    j = np.arange(n)
    vals = ((j * 7 + k * 13 + 3) % 17 - 8) / 5.0
    return vals.reshape(rows, *LATENT).astype(np.float32)


def toy_model(x: np.ndarray, t: float) -> np.ndarray:
    return MODEL_A * x + MODEL_B * (t / 1000.0)


# ---- schedules -----------------------------------------------------------------------------------
def shift_fn(t, s):
    return s * t / (1 + (s - 1) * t)


def sd3_scheduler_sigmas(T: int, shift: float = 3.0, n_train: int = 1000) -> np.ndarray:
    """diffusers ``FlowMatchEulerDiscreteScheduler`` (SD3/SD3.5 config: shift 3, no dynamic shifting):
    the training sigmas are shift(j / N) for j = N..1, so sigma_min = shift(1 / N) and sigma_max = 1;
    ``set_timesteps(T)`` spaces T timesteps linearly from N sigma_max to N sigma_min, divides by N,
    applies the shift again and appends a final 0. This is what Flow-GRPO's and TreeGRPO's SD3
    pipelines sample with (they pass no explicit sigmas)."""
    sigma_min = shift_fn(1.0 / n_train, shift)
    t = np.linspace(1.0 * n_train, sigma_min * n_train, T) / n_train
    return np.concatenate([shift_fn(t, shift), [0.0]])


def flux_linspace_schedule(T: int, shift: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """DanceGRPO ``fastvideo/train_grpo_flux.py::sample_reference_model`` / MixGRPO ``run_sample_step``:
    sigma = sd3_time_shift(shift, linspace(1, 0, T + 1)) in float32 torch; the transformer is fed
    ``int(sigma * 1000)`` (then divided by 1000). Returns (sigmas [T+1], integer timesteps [T])."""
    lin = np.linspace(1.0, 0.0, T + 1).astype(np.float32)
    s = np.float32(shift)
    sig = (s * lin / (np.float32(1) + (s - np.float32(1)) * lin)).astype(np.float32)
    ts = np.array([int(np.float32(v) * np.float32(1000)) for v in sig[:T]], dtype=np.float64)
    return sig, ts


# ---- step rules ----------------------------------------------------------------------------------
def gauss_logp(x, mean, std):
    lp = -((x - mean) ** 2) / (2 * std**2) - np.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.reshape(lp.shape[0], -1).mean(axis=1)


def dance_step(v, x, sig, i, eta, z):
    """DanceGRPO ``flux_step`` with ``sde_solver=True``: mean = x + dsigma v, then the score correction
    -(eta^2 / 2) score dsigma with score = -(x - (1 - sigma) x0) / sigma^2, x0 = x - sigma v; std =
    eta sqrt(sigma - sigma_next). Returns (next, x0, logp)."""
    s, sn = float(sig[i]), float(sig[i + 1])
    ds = sn - s
    x0 = x - s * v
    mean = x + ds * v
    score = -(x - x0 * (1 - s)) / s**2
    mean = mean + (-0.5 * eta**2 * score) * ds
    std = eta * math.sqrt(s - sn)
    nxt = mean + std * z
    return nxt, x0, gauss_logp(nxt, mean, std)


def flow_grpo_step(v, x, sig, i, eta, z, log_std=None):
    """Flow-GRPO ``sde_step_with_logprob`` = MixGRPO ``flow_grpo_step`` = TreeGRPO's
    ``flow_match_euler_discrete_step_with_logprob`` (the latter clamps the step std to
    [e^log_std[0], e^log_std[1]]). sigma_max in the denominator at sigma = 1 is sigmas[1]."""
    s, sn = float(sig[i]), float(sig[i + 1])
    dt = sn - s
    den = float(sig[1]) if s == 1.0 else s
    std_dev = math.sqrt(s / (1 - den)) * eta
    mean = x * (1 + std_dev**2 / (2 * s) * dt) + v * (1 + std_dev**2 * (1 - s) / (2 * s)) * dt
    std = std_dev * math.sqrt(-dt)
    if log_std is not None:
        std = min(max(std, math.exp(log_std[0])), math.exp(log_std[1]))
    nxt = mean + std * z
    return nxt, x - s * v, gauss_logp(nxt, mean, std)


# ---- trajectories --------------------------------------------------------------------------------
def dancegrpo_trajectory(T=4, shift=3.0, eta=0.3, G=2):
    """DanceGRPO ``run_sample_step``: every step ``flux_step`` (SDE), the group shares one initial noise
    (``--init_same_noise``), and the returned image latent is ``pred_original`` of the LAST step (the
    last evaluation's x0-prediction), not the sampled last latent. Returns (decoded, last sample,
    log-probs [G, T])."""
    sig, ts = flux_linspace_schedule(T, shift)
    x = np.repeat(noise(0, 1), G, axis=0).astype(np.float64)
    lps = []
    for i in range(T):
        v = toy_model(x, ts[i])
        x, x0, lp = dance_step(v, x, sig, i, eta, noise(i + 1, G))
        lps.append(lp)
    return x0, x, np.stack(lps, axis=1)


def mixgrpo_flash_trajectory(T=8, shift=3.0, eta=0.7, G=2, window=2, ratio=0.5):
    """MixGRPO ``run_sample_step`` with ``dpm_algorithm_type=dpmsolver++``, ``dpm_apply_strategy=post``,
    order 2, midpoint, ``--flow_grpo_sampling``, window [0, window): up to the window's last step the
    FLUX linspace schedule with Flow-GRPO SDE steps inside the window (each step's x0 = x - sigma v
    is pushed into the DPM state); after it the schedule is replaced by
    shift(linspace(linspace(1, 0, T + 1)[last + 1], 0, num_post)), num_post = int(max((T - last) ratio,
    1)), integrated with multistep DPM-Solver++: 2nd order (D1 = (m0 - m1) / r0) while a previous x0
    exists, 1st order at the final step. Returns the final latent (what is decoded)."""
    sig, _ = flux_linspace_schedule(T, shift)
    last = window - 1
    num_post = int(max((T - last) * ratio, 1))
    u = float(np.linspace(1, 0, T + 1).astype(np.float32)[last + 1])
    post = shift_fn(np.linspace(u, 0.0, num_post), shift)
    full = np.concatenate([sig[:last + 1].astype(np.float64), post])
    x = np.repeat(noise(0, 1), G, axis=0).astype(np.float64)
    states: list[np.ndarray] = []
    k = 1
    for i in range(len(full) - 1):
        t_in = int(np.float32(full[i]) * np.float32(1000))
        v = toy_model(x, t_in)
        x0 = x - full[i] * v
        states.append(x0)
        if i <= last:
            x, _, _ = flow_grpo_step(v, x, full, i, eta, noise(k, G))
            k += 1
            continue
        s0, t = full[i], full[i + 1]
        lam = lambda s: math.log(1 - s) - math.log(s) if s > 0 else math.inf
        h = lam(t) - lam(s0)
        if i == len(full) - 2:  # lower_order_final: first order; at sigma_t = 0 this is x0
            x = (t / s0) * x - (1 - t) * (math.exp(-h) - 1.0) * x0 if t > 0 else x0
        else:
            s1 = full[i - 1]
            r0 = (lam(s0) - lam(s1)) / h
            d1 = (x0 - states[-2]) / r0
            x = (t / s0) * x - (1 - t) * (math.exp(-h) - 1.0) * x0 - 0.5 * (1 - t) * (math.exp(-h) - 1.0) * d1
    return x, full


def treegrpo_backup(rewards):
    """TreeGRPO ``RLTrainer.sample`` + ``update_advantages`` for one tree with k = 3, d = 2 (root ->
    A, B, C -> 3 leaves each, leaves in order A1 A2 A3 B1 ...): leaf advantage (r - mean) / (population
    std + 1e-8) over the prompt's leaves; an internal node's value is the plain mean of its children's
    values, and the edge into a node carries the node's value. Returns (edge advantages into A, B, C,
    leaf advantages)."""
    r = np.asarray(rewards, dtype=np.float64)
    leaf = (r - r.mean()) / (r.std() + 1e-8)
    mids = leaf.reshape(3, 3).mean(axis=1)
    return mids, leaf


def treegrpo_clamped_step():
    """TreeGRPO's step at the SD3 schedule's last nonzero sigma (T = 10: 0.00893 -> 0), where the step
    std 0.7 sqrt(s / (1 - s)) sqrt(s) = 0.0063 is raised to the clamp e^-5 = 0.0067. Returns
    (log-prob with the clamp, log-prob without) of a fixed next latent."""
    sig = sd3_scheduler_sigmas(10)
    x = noise(0, 2).astype(np.float64)
    v = toy_model(x, sig[9] * 1000)
    prev = x - sig[9] * v + 0.004 * noise(1, 2)
    s, sn = float(sig[9]), float(sig[10])
    outs = []
    for clamp in ((-5.0, 2.0), None):
        dt = sn - s
        std_dev = math.sqrt(s / (1 - s)) * 0.7
        mean = x * (1 + std_dev**2 / (2 * s) * dt) + v * (1 + std_dev**2 * (1 - s) / (2 * s)) * dt
        std = std_dev * math.sqrt(-dt)
        if clamp is not None:
            std = min(max(std, math.exp(clamp[0])), math.exp(clamp[1]))
        outs.append(gauss_logp(prev, mean, std))
    return outs[0], outs[1], x, v, prev


def sd_alphas_cumprod(n=1000, beta_start=0.00085, beta_end=0.012):
    """SD 1.x "scaled_linear" betas: linspace(sqrt(b0), sqrt(b1), N)^2; alpha_bar = cumprod(1 - beta)."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def ddpo_trajectory(T=5, eta=1.0, B=2):
    """ddpo-pytorch ``pipeline_with_logprob`` + ``ddim_step_with_logprob`` on the SD 1.x DDIM config
    (steps_offset 1, set_alpha_to_one False, clip_sample False): timesteps (999 // ... "leading"
    spacing) = arange(T) * (1000 // T), reversed, + 1; prev_t = t - 1000 // T, alpha_bar_prev =
    alphas_cumprod[prev_t] or alphas_cumprod[0] when prev_t < 0; x0 = (x - sqrt(1 - a) eps) / sqrt(a);
    variance (1 - a_prev) / (1 - a) (1 - a / a_prev), std = eta sqrt(variance); mean = sqrt(a_prev) x0 +
    sqrt(1 - a_prev - std^2) eps; i.i.d. initial noises. Returns (log-probs [B, T], final sample)."""
    ac = sd_alphas_cumprod()
    ratio = 1000 // T
    ts = (np.arange(T) * ratio)[::-1] + 1
    x = noise(0, B).astype(np.float64)
    lps = []
    for i, t in enumerate(ts):
        eps = toy_model(x, float(t))
        a = ac[t]
        prev_t = t - ratio
        ap = ac[prev_t] if prev_t >= 0 else ac[0]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        var = (1 - ap) / (1 - a) * (1 - a / ap)
        std = eta * math.sqrt(var)
        mean = math.sqrt(ap) * x0 + math.sqrt(1 - ap - std**2) * eps
        x = mean + std * noise(i + 1, B)
        lps.append(gauss_logp(x, mean, std))
    return np.stack(lps, axis=1), x


TREE_REWARDS = [0.2, 0.5, 0.9, 0.1, 0.4, 0.3, 0.8, 0.6, 0.7]


# ---- Flow-GRPO (yifan123/flow_grpo) ----------------------------------------------------------------
MODEL_A_REF = -0.4  # the toy reference denoiser of the KL parity: output = MODEL_A_REF * x + B t / 1000
FLOW_GRPO_PROMPTS = ["a", "b", "a", "c", "b", "a", "c", "c"]
FLOW_GRPO_REWARDS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 2.5, 0.5]


def flow_grpo_stat_tracker(prompts, rewards, global_std):
    """``flow_grpo/stat_tracking.py::PerPromptStatTracker.update`` (type "grpo") on a fresh tracker: per
    prompt text, mean of its rewards; std = numpy's population std of the prompt's rewards, or of ALL
    rewards with ``global_std``; 1e-4 is added to the std; A = (r - mean) / std."""
    prompts = np.array(prompts)
    r = np.array(rewards, dtype=np.float64)
    adv = np.zeros_like(r)
    for p in np.unique(prompts):
        sel = prompts == p
        std = (np.std(r) if global_std else np.std(r[sel])) + 1e-4
        adv[sel] = (r[sel] - np.mean(r[sel])) / std
    return adv


def flow_grpo_fast_trajectory(T=6, shift=3.0, eta=0.7, G=2, window=(1, 3)):
    """``sd3_pipeline_with_logprob_fast``: steps inside ``sde_window`` [start, end) call
    ``sde_step_with_logprob`` with the noise level, the others with noise level 0 (std_dev_t = 0: the
    Euler step x + v dt); SD3 scheduler sigmas, timesteps = 1000 sigma, i.i.d. initial noises; the
    image is the last latent. Also the KL term of ``train_sd3.py`` for the window's edges against a toy
    reference denoiser (A = MODEL_A_REF): mean over dims of (mean - mean_ref)^2 / (2 std_dev_t^2), with
    std_dev_t = eta sqrt(sigma / (1 - sigma)) (sigmas[1] in the denominator at sigma = 1).
    Returns (final latent, window log-probs [G, w], KL per edge [G, w])."""
    sig = sd3_scheduler_sigmas(T, shift)
    x = noise(0, G).astype(np.float64)
    lps, kls = [], []
    draw = 1
    for i in range(T):
        t = sig[i] * 1000.0
        v = toy_model(x, t)
        if window[0] <= i < window[1]:
            xin = x
            x, _, lp = flow_grpo_step(v, xin, sig, i, eta, noise(draw, G))
            draw += 1
            lps.append(lp)
            s, sn = float(sig[i]), float(sig[i + 1])
            den = float(sig[1]) if s == 1.0 else s
            std_dev = math.sqrt(s / (1 - den)) * eta
            v_ref = MODEL_A_REF * xin + MODEL_B * (t / 1000.0)
            dt = sn - s
            m = xin * (1 + std_dev**2 / (2 * s) * dt) + v * (1 + std_dev**2 * (1 - s) / (2 * s)) * dt
            m_ref = xin * (1 + std_dev**2 / (2 * s) * dt) + v_ref * (1 + std_dev**2 * (1 - s) / (2 * s)) * dt
            kls.append(((m - m_ref) ** 2).reshape(G, -1).mean(axis=1) / (2 * std_dev**2))
        else:
            x = x + v * (float(sig[i + 1]) - float(sig[i]))
    return x, np.stack(lps, axis=1), np.stack(kls, axis=1)


# ---- BranchGRPO (Fredreic1849/BranchGRPO, fastvideo/train_branchgrpo_flux.py) ----------------------
BRANCH_REWARDS = [0.2, 0.9, 0.4, 0.3, 0.8, 0.1, 0.6, 0.5]  # leaves of a binary tree of depth 3, leaf order
#: sampling-time log-probs of the edges into the nodes of depths 1, 2, 3 (children of a node contiguous)
BRANCH_EDGE_LOGPS = [[0.1, -0.2], [0.3, -0.5, 0.0, 0.4], [-1.0, 0.5, 0.2, -0.3, 0.9, 0.1, -0.4, -0.6]]


def branchgrpo_split_trajectory(T=3, shift=3.0, eta=0.3, scale=4.0, splits=(0, 1)):
    """``run_tree_sample_step`` for one prompt (one root) with binary splits: every step is
    ``flux_step_with_split`` (DanceGRPO's SDE step with ``sde_solver``); at a split point each node's two
    children are mean + scale * std * z, and their log-prob uses the UNSCALED std; elsewhere one child,
    mean + std * z. Children of a node are contiguous, nodes keep their order. The image is the last
    step's ``pred_original``. Also returns the log-probs the children would have under the std they
    were drawn with (scale * std at split steps). Returns (decoded, logp_code [N-1], logp_sampling [N-1])
    with the edges in creation order (level by level)."""
    sig, ts = flux_linspace_schedule(T, shift)
    x = noise(0, 1).astype(np.float64)
    lp_code, lp_samp = [], []
    for i in range(T):
        v = toy_model(x, ts[i])
        s, sn = float(sig[i]), float(sig[i + 1])
        ds = sn - s
        x0 = x - s * v
        mean = x + ds * v + (-0.5 * eta**2 * (-(x - x0 * (1 - s)) / s**2)) * ds
        std = eta * math.sqrt(s - sn)
        k = 2 if i in splits else 1
        mean, x0 = np.repeat(mean, k, axis=0), np.repeat(x0, k, axis=0)
        sc = scale if k > 1 else 1.0
        x = mean + sc * std * noise(i + 1, mean.shape[0])
        lp_code.append(gauss_logp(x, mean, std))
        lp_samp.append(gauss_logp(x, mean, sc * std))
    return x0, np.concatenate(lp_code), np.concatenate(lp_samp)


def branchgrpo_depth_advantages(leaf_rewards, edge_logps=None):
    """``compute_node_rewards_from_leaves`` + ``compute_hierarchical_advantages_by_depth`` on one full
    binary tree (the children of a node are contiguous). Node rewards: the mean of the node's leaf
    descendants, or with ``edge_logps`` (per depth 1..D, the log-probs of the edges into that depth's
    nodes) the softmax over a node's two children of their edge log-probs, times the children's
    rewards, from the deepest level up. Per depth: (r - mean) / (unbiased std + 1e-8), zero for a
    single node or a std below 1e-6. Returns the advantages of depths 1..D, concatenated."""
    r = np.array(leaf_rewards, dtype=np.float64)
    D = int(round(math.log2(r.size)))
    rewards = {D: r}
    for d in range(D - 1, 0, -1):
        child = rewards[d + 1].reshape(-1, 2)
        if edge_logps is None:
            n_leaves = 2 ** (D - d)
            rewards[d] = r.reshape(-1, n_leaves).mean(axis=1)
        else:
            lp = np.array(edge_logps[d], dtype=np.float64).reshape(-1, 2)  # edges into depth d + 1
            w = np.exp(lp - lp.max(axis=1, keepdims=True))
            rewards[d] = (w / w.sum(axis=1, keepdims=True) * child).sum(axis=1)

    def norm(v):
        if v.size < 2:
            return np.zeros_like(v)
        sd = v.std(ddof=1)
        return np.zeros_like(v) if sd < 1e-6 else (v - v.mean()) / (sd + 1e-8)

    return np.concatenate([norm(rewards[d]) for d in range(1, D + 1)])


# ---- DiffusionNFT (NVlabs/DiffusionNFT) ------------------------------------------------------------
MODEL_A_OLD = -0.45  # the toy old-policy denoiser of the NFT loss parity: output = MODEL_A_OLD x + B t / 1000
NFT_ADVANTAGES = [2.0, -1.0, 0.3, -7.0, 6.5, 0.0]   # one per image: two beyond the clamp at 5, one exactly 0
NFT_SIGMA_IDX = [0, 3, 5, 8, 2, 9]                   # the trained step of each image (SD3 T=10 sigmas)


def nft_return_decay(step, decay_type):
    """``scripts/train_nft_sd3.py::return_decay``: (flat, uprate, uphold) = (0, 0, 0) | (0, 0.001, 0.5) |
    (75, 0.0075, 0.999); 0 before ``flat`` steps, else min((step - flat) uprate, uphold)."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


def nft_dpm2_trajectory(T=10, G=2):
    """``flow_grpo/diffusers_patch/solver.py::run_sampling`` with ``solver="dpm2"``, deterministic, on the
    SD3 scheduler sigmas: step 0 and the last step ``ddim_update`` with eta 0, every other step
    ``multistep_dpm_solver_second_order_update`` on the x0 outputs (``convert_model_output``: x - sigma v);
    the model sees timestep = sigma * 1000. Returns the final latent [G, ...]."""
    sig = sd3_scheduler_sigmas(T)
    x = noise(0, G).astype(np.float64)
    outs = []
    for i in range(T):
        s, t = sig[i], sig[i + 1]
        v = toy_model(x, s * 1000.0)
        x0 = x - s * v
        outs.append(x0)
        if i == 0 or i == T - 1:  # ddim_update, eta = 0: prev = (1 - t) x0 + t (x - (1 - s) x0) / s
            x = (1 - t) * x0 + t * (x - (1 - s) * x0) / s
            continue
        s1 = sig[i - 1]
        lam = lambda u: (math.log(1 - u) if u < 1 else -math.inf) - math.log(u)
        h, h0 = lam(t) - lam(s), lam(s) - lam(s1)  # after a step from sigma = 1: h0 = inf, r0 = inf, D1 = 0
        d1 = (outs[-1] - outs[-2]) / (h0 / h)
        x = (t / s) * x - (1 - t) * (math.exp(-h) - 1.0) * outs[-1] - 0.5 * (1 - t) * (math.exp(-h) - 1.0) * d1
    return x


def nft_loss_terms(beta=1.0, adv_clip_max=5.0, adv_mode="all"):
    """The training loop of ``scripts/train_nft_sd3.py::main`` for one (image, step) per image: x0 = the
    clean latents noise(20, 6), eps = noise(21, 6), t = sigma of NFT_SIGMA_IDX, x_t = (1 - t) x0 + t eps;
    v = the toy model, v_old = the toy model with A = MODEL_A_OLD; advantages NFT_ADVANTAGES clamped to
    +-c, reshaped by ``adv_mode``, r = clip((A / c) / 2 + 0.5, 0, 1); v+ = beta v + (1 - beta) v_old,
    v- = (1 + beta) v_old - beta v; x0+- = x_t - t v+-; weight = clip(mean |x0+- - x0|, 1e-5);
    L+- = mean((x0+- - x0)^2 / weight); per image c (r L+ / beta + (1 - r) L- / beta).
    Returns (r [6], per-image loss [6])."""
    sig = sd3_scheduler_sigmas(10)
    x0 = noise(20, 6).astype(np.float64)
    eps = noise(21, 6).astype(np.float64)
    t = sig[NFT_SIGMA_IDX].reshape(-1, 1, 1, 1)
    xt = (1 - t) * x0 + t * eps
    v = MODEL_A * xt + MODEL_B * t
    v_old = MODEL_A_OLD * xt + MODEL_B * t
    a = np.clip(np.array(NFT_ADVANTAGES), -adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = np.clip(a, 0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = np.clip(a, -adv_clip_max, 0)
    elif adv_mode == "one_only":
        a = np.where(a > 0, 1.0, 0.0)
    elif adv_mode == "binary":
        a = np.sign(a)
    r = np.clip((a / adv_clip_max) / 2.0 + 0.5, 0, 1)
    pos = xt - t * (beta * v + (1 - beta) * v_old)
    neg = xt - t * ((1 + beta) * v_old - beta * v)
    w_pos = np.clip(np.abs(pos - x0).mean(axis=(1, 2, 3), keepdims=True), 1e-5, None)
    w_neg = np.clip(np.abs(neg - x0).mean(axis=(1, 2, 3), keepdims=True), 1e-5, None)
    l_pos = ((pos - x0) ** 2 / w_pos).mean(axis=(1, 2, 3))
    l_neg = ((neg - x0) ** 2 / w_neg).mean(axis=(1, 2, 3))
    return r, adv_clip_max * (r * l_pos / beta + (1 - r) * l_neg / beta)


#: BranchGRPO update parity: per trained edge (in the shuffled training order) its advantage and the
#: derivative c of its new log-prob in the single weight w (logp_new = logp_old + w c), on two trees
BRANCH_UPDATE_ADV = [1.2, -0.7, 0.4, -1.5, 0.9, 0.1, -0.3, 2.0, -0.8]
BRANCH_UPDATE_C = [0.5, -1.0, 2.0, 0.3, -0.4, 1.5, -2.5, 0.8, 1.1]


def branchgrpo_update_loop(adv, c, trees=2, ga=4, clip_range=0.03, adv_clip_max=1.8, lr=0.5, w0=0.0):
    """``train_one_step_tree``'s update loop on a one-weight model whose edge log-prob is
    logp_old + w c: for the i-th shuffled sample, ratio = exp(w c), loss = max(-A r, -A clip(r, 1 +- eps))
    / (GA * (len(samples) // num_trees)) with A clamped to +-adv_clip_max, backward (d loss / d w =
    -A r c / denom on the unclipped branch, 0 where the clipped branch is the max and the ratio is outside
    the clip range), ``optimizer.step()`` (plain SGD here) when (i + 1) % GA == 0 and once more after the
    loop for a remainder. Returns (w after every optimizer step, the per-sample logged losses)."""
    denom = ga * max(1, len(adv) // trees)
    w, g, ws, losses = float(w0), 0.0, [], []
    for i, (a, ci) in enumerate(zip(adv, c)):
        a = min(max(a, -adv_clip_max), adv_clip_max)
        r = math.exp(w * ci)
        rc = min(max(r, 1 - clip_range), 1 + clip_range)
        unc, clp = -a * r, -a * rc
        losses.append(max(unc, clp) / denom)
        if unc >= clp:
            g += -a * r * ci / denom
        if (i + 1) % ga == 0:
            w -= lr * g
            g = 0.0
            ws.append(w)
    if len(adv) % ga:
        w -= lr * g
        ws.append(w)
    return ws, losses


# ---- MixGRPO multi-reward (Tencent-Hunyuan/MixGRPO, fastvideo/train_grpo_flux.py, multi_reward_mix) ------
#: per reward model, the rewards of 2 prompts x num_generations 4 (contiguous groups, as the trainer lays
#: them out): HPS, ImageReward, PickScore scales
MIX_MULTI_REWARDS = {"hpsv2": [0.27, 0.29, 0.26, 0.31, 0.24, 0.25, 0.28, 0.22],
                     "image_reward": [0.5, -1.2, 1.1, 0.3, -0.4, 0.9, 0.2, -1.5],
                     "pickscore": [21.3, 21.9, 20.8, 22.4, 20.1, 20.6, 21.0, 20.9]}


def mixgrpo_advantage_aggr(rewards, weights, G=4):
    """``multi_reward_mix == "advantage_aggr"`` with ``use_group`` and ``trimmed_ratio`` 0: per reward model
    and per group of G contiguous samples, (r - mean) / (unbiased std + 1e-8); the weights divided by their
    total (``reward_weights = {k: v / total_weight}``); ``merged_advantages += model_advs * weight``."""
    total = sum(weights.values())
    w = {k: v / total for k, v in weights.items()}
    out = np.zeros(len(next(iter(rewards.values()))))
    for name, r in rewards.items():
        r = np.asarray(r, dtype=np.float64)
        adv = np.zeros_like(r)
        for i in range(len(r) // G):
            g = r[i * G:(i + 1) * G]
            adv[i * G:(i + 1) * G] = (g - g.mean()) / (g.std(ddof=1) + 1e-8)
        out += adv * w[name]
    return out


#: a BranchGRPO tree with single-child chains below each split (T = 4, splits at steps 0 and 2): node n's
#: parent, in creation order; the leaves are nodes 9..12; the log-prob of the edge into each node
BRANCH_CHAIN_PARENT = [-1, 0, 0, 1, 2, 3, 3, 4, 4, 5, 6, 7, 8]
BRANCH_CHAIN_LOGPS = [0.0, -7.9, -3.6, 0.2, -0.1, -8.4, -6.2, -2.0, -5.5, 0.4, 0.1, -0.3, 0.6]
BRANCH_CHAIN_REWARDS = [0.35, 0.8, 0.1, 0.55]


def branchgrpo_tree_advantages(parent, leaf_rewards, logps):
    """``compute_node_rewards_from_leaves(use_prob_weighted=True)`` + ``compute_hierarchical_advantages_by_depth``
    on an arbitrary tree given by parent pointers: bottom-up over depths, a node with one child takes its
    child's reward (the chain below a split), a node with several the softmax (temperature 1) of its
    children's ``log_prob`` times their rewards; per depth (r - mean) / (unbiased std + 1e-8), zero for one
    node or a std below 1e-6. Returns the advantage of every non-root node (the edge into it)."""
    n = len(parent)
    children = {i: [c for c in range(n) if parent[c] == i] for i in range(n)}
    depth = [0] * n
    for i in range(n):
        j = i
        while parent[j] >= 0:
            depth[i] += 1
            j = parent[j]
    leaves = [i for i in range(n) if not children[i]]
    reward = dict(zip(leaves, leaf_rewards))
    for d in range(max(depth) - 1, -1, -1):
        for i in (i for i in range(n) if depth[i] == d and children[i]):
            c = children[i]
            if len(c) == 1:
                reward[i] = reward[c[0]]
            else:
                lp = np.array([logps[x] for x in c])
                w = np.exp(lp - lp.max())
                w /= w.sum()
                reward[i] = float((w * np.array([reward[x] for x in c])).sum())
    adv = np.zeros(n)
    for d in range(max(depth) + 1):
        ids = [i for i in range(n) if depth[i] == d]
        v = np.array([reward[i] for i in ids])
        if v.size > 1 and v.std(ddof=1) >= 1e-6:
            adv[ids] = (v - v.mean()) / (v.std(ddof=1) + 1e-8)
    return adv[1:]


# ---- EMA of the trained weights (flow_grpo / DiffusionNFT flow_grpo/ema.py::EMAModuleWrapper) ------------
def ema_wrapper_epoch(ema, thetas, global_step, calls_per_step, interval, decay):
    """One epoch of a trainer holding ``EMAModuleWrapper(params, decay, update_step_interval=interval)``:
    ``thetas[0]`` are the weights at the epoch's start, ``thetas[k]`` after its k-th optimizer step. The
    trainer runs ``calls_per_step`` training batches per optimizer step (train_sd3.py: GA batches; the
    optimizer steps when the accumulation syncs, after every GA-th batch, and ``global_step += 1``) and calls
    ``ema.step(params, global_step)`` after every batch (DiffusionNFT: after every optimizer step,
    calls_per_step = 1). ``step``: d = min((1 + g) / (10 + g), decay); when (g + 1) % interval == 0,
    ema += (1 - d) (theta - ema). Returns (ema, global_step) after the epoch (numpy float64)."""
    ema = np.array(ema, dtype=np.float64)
    k = 0
    for b in range((len(thetas) - 1) * calls_per_step):
        if (b + 1) % calls_per_step == 0:
            k += 1
            global_step += 1
        d = min((1 + global_step) / (10 + global_step), decay)
        if (global_step + 1) % interval == 0:
            ema += (1 - d) * (np.asarray(thetas[k], dtype=np.float64) - ema)
    return ema, global_step


def ema_wrapper_after_epoch(ema, thetas, global_step, interval, decay):
    """One epoch of AWM's ``train_sd3_awm.py::main``: the inner loop takes ``len(thetas) - 1`` optimizer steps
    (``global_step += 1`` after each), then ``ema.step(params, global_step)`` is called once, after the loop,
    with the final weights ``thetas[-1]`` (the same ``EMAModuleWrapper.step`` as above). Returns (ema,
    global_step) after the epoch (numpy float64)."""
    ema = np.array(ema, dtype=np.float64)
    global_step += len(thetas) - 1
    d = min((1 + global_step) / (10 + global_step), decay)
    if (global_step + 1) % interval == 0:
        ema += (1 - d) * (np.asarray(thetas[-1], dtype=np.float64) - ema)
    return ema, global_step


def _fmt(a) -> str:
    return np.array2string(np.asarray(a, dtype=np.float64).ravel(), precision=8, separator=", ",
                           max_line_width=100, floatmode="fixed")


if __name__ == "__main__":
    print("SD3 T=10", _fmt(sd3_scheduler_sigmas(10)))
    print("SD3 T=28", _fmt(sd3_scheduler_sigmas(28)))
    sig, ts = flux_linspace_schedule(16)
    print("FLUX T=16 sigmas", _fmt(sig))
    print("FLUX T=16 timesteps", _fmt(ts))
    dec, last, lp = dancegrpo_trajectory()
    print("DanceGRPO decoded (x0 of last eval)", _fmt(dec))
    print("DanceGRPO sampled last latent", _fmt(last))
    print("DanceGRPO log-probs", _fmt(lp))
    fin, full = mixgrpo_flash_trajectory()
    print("MixGRPO-Flash schedule", _fmt(full))
    print("MixGRPO-Flash final latent", _fmt(fin))
    mids, leaf = treegrpo_backup(TREE_REWARDS)
    print("TreeGRPO edge advantages into A, B, C", _fmt(mids))
    print("TreeGRPO leaf advantages", _fmt(leaf))
    clamped, free, *_ = treegrpo_clamped_step()
    print("TreeGRPO clamped-step log-prob", _fmt(clamped), "unclamped", _fmt(free))
    lps, fin = ddpo_trajectory()
    print("DDPO log-probs", _fmt(lps))
    print("DDPO final sample", _fmt(fin))
    print("Flow-GRPO advantages, global std", _fmt(flow_grpo_stat_tracker(FLOW_GRPO_PROMPTS, FLOW_GRPO_REWARDS, True)))
    print("Flow-GRPO advantages, per-prompt std",
          _fmt(flow_grpo_stat_tracker(FLOW_GRPO_PROMPTS, FLOW_GRPO_REWARDS, False)))
    fin, lp, kl = flow_grpo_fast_trajectory()
    print("Flow-GRPO-Fast final latent", _fmt(fin))
    print("Flow-GRPO-Fast window log-probs", _fmt(lp))
    print("Flow-GRPO KL per window edge", _fmt(kl))
    dec, lpc, lps = branchgrpo_split_trajectory()
    print("BranchGRPO decoded (x0 of last eval)", _fmt(dec))
    print("BranchGRPO edge log-probs, unscaled std (code)", _fmt(lpc))
    print("BranchGRPO edge log-probs, sampling std", _fmt(lps))
    print("BranchGRPO depth-wise advantages, mean", _fmt(branchgrpo_depth_advantages(BRANCH_REWARDS)))
    print("BranchGRPO depth-wise advantages, prob-weighted",
          _fmt(branchgrpo_depth_advantages(BRANCH_REWARDS, BRANCH_EDGE_LOGPS)))
    for wts in ({"hpsv2": 1.0, "image_reward": 1.0, "pickscore": 1.0},
                {"hpsv2": 2.0, "image_reward": 1.0, "pickscore": 1.0}):
        print(f"MixGRPO advantage_aggr weights {wts}", _fmt(mixgrpo_advantage_aggr(MIX_MULTI_REWARDS, wts)))
    print("BranchGRPO prob-weighted advantages, chains below the splits",
          _fmt(branchgrpo_tree_advantages(BRANCH_CHAIN_PARENT, BRANCH_CHAIN_REWARDS, BRANCH_CHAIN_LOGPS)))
    ws, losses = branchgrpo_update_loop(BRANCH_UPDATE_ADV, BRANCH_UPDATE_C)
    print("BranchGRPO update loop: w after each step", _fmt(ws), "losses", _fmt(losses))
    print("DiffusionNFT return_decay types 0/1/2 at steps 0, 1, 74, 75, 200, 600",
          _fmt([nft_return_decay(st, ty) for ty in (0, 1, 2) for st in (0, 1, 74, 75, 200, 600)]))
    print("DiffusionNFT dpm2 final latent", _fmt(nft_dpm2_trajectory()))
    for b, mode in ((1.0, "all"), (0.1, "all"), (1.0, "binary"), (1.0, "positive_only")):
        r, loss = nft_loss_terms(beta=b, adv_mode=mode)
        print(f"DiffusionNFT beta={b} adv_mode={mode}: r", _fmt(r), "loss", _fmt(loss))
