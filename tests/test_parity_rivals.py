"""Parity of the rival algorithms (Flow-GRPO and its Fast variant, BranchGRPO, DiffusionNFT) with their reference
trainers.

As in ``tests/test_parity.py``: every expected number was printed once by ``tests/parity_reference.py``
(an independent numpy transcription of the reference code, file and function named there) and pasted
here as a literal; treebench computes its numbers through its own engine and algorithms on the same
toy denoiser and fixed noises.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from parity_reference import (
    BRANCH_CHAIN_LOGPS,
    BRANCH_CHAIN_PARENT,
    BRANCH_CHAIN_REWARDS,
    BRANCH_EDGE_LOGPS,
    BRANCH_REWARDS,
    BRANCH_UPDATE_ADV,
    BRANCH_UPDATE_C,
    FLOW_GRPO_PROMPTS,
    FLOW_GRPO_REWARDS,
    MODEL_A,
    MODEL_A_OLD,
    MODEL_A_REF,
    MODEL_B,
    NFT_ADVANTAGES,
    NFT_SIGMA_IDX,
    noise,
)
from test_parity import BATCH, SD3_T10, ToyPolicy, close

from algorithms.branchgrpo import BranchGRPO, BranchGRPOConfig
from algorithms.common import gaussian_mean_kl, kl_std
from algorithms.diffusionnft import (
    DiffusionNFT,
    DiffusionNFTConfig,
    nft_loss,
    old_policy_decay,
    optimality_probability,
)
from algorithms.flowgrpo import FlowGRPO, FlowGRPOConfig, flow_grpo_advantages
from bench.engine.rollout import RolloutEngine
from bench.types import RewardOutput, SamplerSpec, TrainSpec


class ToyPolicyWithReference(ToyPolicy):
    """The toy denoiser with a frozen reference of another slope (the KL term's ``policy.reference()``)."""

    def __init__(self):
        super().__init__("flow")
        self.a = MODEL_A

    def predict(self, x, t, cond):
        return self.a * x.float() + MODEL_B * (t.float().reshape(-1, 1, 1, 1) / 1000.0)

    @contextlib.contextmanager
    def reference(self):
        self.a = MODEL_A_REF
        try:
            yield
        finally:
            self.a = MODEL_A


# ---- Flow-GRPO: PerPromptStatTracker advantages ----------------------------------------------------------
FLOW_GRPO_ADV_GLOBAL = [-1.30685488, -0.84012099, -0.18669355, 0.93346777, 0.84012099, 1.49354843, 0.09334678,
                        -1.02681455]
FLOW_GRPO_ADV_PROMPT = [-1.13549469, -0.99993334, -0.16221353, 1.16239531, 0.99993334, 1.29770821, 0.11623953,
                        -1.27863484]


def test_flowgrpo_advantages_global_and_per_prompt_std():
    ids = {p: i for i, p in enumerate(sorted(set(FLOW_GRPO_PROMPTS)))}
    groups = torch.tensor([ids[p] for p in FLOW_GRPO_PROMPTS])
    scores = torch.tensor(FLOW_GRPO_REWARDS)
    close(flow_grpo_advantages(scores, groups, global_std=True), FLOW_GRPO_ADV_GLOBAL)
    close(flow_grpo_advantages(scores, groups, global_std=False), FLOW_GRPO_ADV_PROMPT)


# ---- Flow-GRPO-Fast: SDE window, ODE elsewhere; the KL divisor -----------------------------------------
FAST_FINAL = [1.07084727, -1.11538541, -0.52295338, -0.03650219, 1.00968216, -1.63030281, -0.58411848,
              0.00831359]
FAST_LOGP = [-1.26691948, -0.95522346, -1.20191950, -0.66022342]
FAST_KL = [1.47867111e-05, 2.72926434e-05, 1.70285502e-05, 1.01424116e-04]


def test_flowgrpo_fast_window_trajectory_and_kl(fixed_noise):
    sp = SamplerSpec(steps=6, guidance=1.0, noise_level=0.7, shift=3.0)
    cfg = FlowGRPOConfig(group_size=2, sde_window_size=2, sde_window_range=(1, 3), beta=0.04)
    algo = FlowGRPO(cfg, sp, TrainSpec())
    plan = algo.plan(0)
    assert plan.modes == ("ode", "sde", "sde", "ode", "ode", "ode") and plan.final_image == "sample"
    policy = ToyPolicyWithReference()
    eng = RolloutEngine(policy)
    roll = eng.run(plan, BATCH, 0)
    close(roll.images, FAST_FINAL)
    edges = torch.stack([torch.nonzero(roll.level == i + 1).flatten() for i in (1, 2)], dim=1)  # [G, w]
    close(roll.logp_old[edges], FAST_LOGP)
    flat = edges.flatten()
    assert sorted(algo._trained_edges(roll).tolist()) == sorted(flat.tolist())  # exactly the window is trained
    ev = eng.logp(roll, flat)
    ref = eng.logp(roll, flat, reference=True)
    kl = gaussian_mean_kl(ev.mean.detach(), ref.mean, kl_std(roll, flat, ev.std.detach(), "noise_scale"))
    close(kl, FAST_KL)
    exact = gaussian_mean_kl(ev.mean.detach(), ref.mean, kl_std(roll, flat, ev.std.detach(), "step_std"))
    assert bool((exact > kl).all())  # the transition std is smaller than the code's noise scale


# ---- Flow-GRPO: the CFG unconditional branch detached in the update (train_sd3.py::compute_log_prob) ------
class _CfgToy(ToyPolicy):
    """The toy denoiser with a trainable gain w and a prompt-dependent output: w (1 + e) A x + B t / 1000,
    e = 1 for a prompt, 0 for the empty prompt, so the guided output is w A x (1 + g) + B t / 1000."""

    def __init__(self):
        super().__init__("flow")
        self.w = torch.nn.Parameter(torch.ones(()))

    def encode_prompts(self, prompts):
        from bench.model.policy import Conditioning

        return Conditioning({"e": torch.ones(len(prompts), 1)})

    def empty_conditioning(self):
        from bench.model.policy import Conditioning

        return Conditioning({"e": torch.zeros(1, 1)})

    def predict(self, x, t, cond):
        e = cond.tensors["e"].reshape(-1, 1, 1, 1).float()
        return self.w * (1 + e) * MODEL_A * x.float() + MODEL_B * (t.float().reshape(-1, 1, 1, 1) / 1000.0)


def test_flowgrpo_cfg_grad_detaches_the_unconditional_branch(fixed_noise):
    """compute_log_prob: v = sg(v_u) + g (v_c - sg(v_u)) -> dv/dw = g dv_c/dw = 2 g A x; both branches
    (train_sd3_fast.py): dv/dw = (1 + g) A x. The log-prob's gradient in w scales by 2 g / (1 + g)."""
    import dataclasses

    g = 3.0
    grads = {}
    pol = _CfgToy()
    sp = SamplerSpec(steps=3, guidance=g, noise_level=0.7)
    eng = RolloutEngine(pol)
    roll = eng.run(FlowGRPO(FlowGRPOConfig(group_size=2), sp, TrainSpec()).plan(0), BATCH, 0)
    edges = torch.nonzero(roll.parent >= 0).flatten()
    for mode in ("cond", "both"):
        plan = FlowGRPO(FlowGRPOConfig(group_size=2, cfg_grad=mode), sp, TrainSpec()).plan(0)
        assert plan.cfg_uncond_grad is (mode == "both")
        ev = eng.logp(dataclasses.replace(roll, plan=plan), edges)
        assert ev.nfe == 2 * edges.numel()  # both rows evaluated either way
        (grad,) = torch.autograd.grad(ev.log_prob.sum(), pol.w)
        grads[mode] = float(grad)
    assert grads["both"] != 0.0
    close([grads["cond"] / grads["both"]], [2 * g / (1 + g)])
    assert FlowGRPOConfig().cfg_grad == "cond"


# ---- BranchGRPO: split children drawn with a scaled noise, scored with the unscaled (or sampling) std ----
BRANCH_DECODED = [-0.03049144, -0.76549262, -1.82704633, 0.12757140, -0.97976866, 0.97484896, -2.77632353,
                  -0.82170582, -2.71869657, -0.76407892, -1.82563260, -0.32329016, -0.97835498, -1.71335608,
                  -2.77490986, 1.41705135]
BRANCH_LOGP_CODE = [-8.18201190, -7.14201198, -8.39590420, -3.67590377, -8.39590420, -7.59590320, 0.17044713,
                    0.01544713, -0.04955286, 0.23044712]
BRANCH_LOGP_SAMPLING = [-0.71830526, -0.65330527, -1.00719833, -0.71219831, -1.00719833, -0.95719827, 0.17044713,
                        0.01544713, -0.04955286, 0.23044712]


def _branch(over, steps):
    sp = SamplerSpec(steps=steps, guidance=1.0, noise_level=0.3, sde_type="dance", shift=3.0, schedule="linspace")
    return BranchGRPO(BranchGRPOConfig(**over), sp, TrainSpec())


@pytest.mark.parametrize("split_logp,expected", [("step", BRANCH_LOGP_CODE), ("sampling", BRANCH_LOGP_SAMPLING)])
def test_branchgrpo_split_noise_and_its_log_prob(fixed_noise, split_logp, expected):
    algo = _branch({"split_points": (0, 1), "split_noise_scale": 4.0, "split_logp": split_logp}, 3)
    plan = algo.plan(0)
    assert plan.branch == (2, 2, 1) and plan.final_image == "x0"
    eng = RolloutEngine(ToyPolicy(), schedule="linspace", shift=3.0)
    roll = eng.run(plan, BATCH, 0)
    close(roll.images, BRANCH_DECODED)
    edges = torch.nonzero(roll.parent >= 0).flatten()
    close(roll.logp_old[edges], expected)
    # the update's recomputation scores the edges the same way
    close(eng.logp(roll, edges).log_prob.detach(), expected)


# ---- BranchGRPO: node rewards from leaf descendants and depth-wise normalisation -------------------------
BRANCH_ADV_MEAN = [-0.70710658, 0.70710658, 0.78334937, -1.30558228, -0.26111646, 0.78334937, -0.97664157,
                   1.50935516, -0.26635679, -0.62149918, 1.15421277, -1.33178396, 0.44392799, 0.08878560]
BRANCH_ADV_WEIGHTED = [0.70710665, -0.70710665, 1.21678697, -1.22697029, 0.08852183, -0.07833851, -0.97664157,
                       1.50935516, -0.26635679, -0.62149918, 1.15421277, -1.33178396, 0.44392799, 0.08878560]


@pytest.mark.parametrize("weighted,expected", [(False, BRANCH_ADV_MEAN), (True, BRANCH_ADV_WEIGHTED)])
def test_branchgrpo_depthwise_advantages(fixed_noise, weighted, expected):
    algo = _branch({"split_points": (0, 1, 2), "prob_weighted": weighted}, 3)
    roll = RolloutEngine(ToyPolicy(), schedule="linspace", shift=3.0).run(algo.plan(0), BATCH, 0)
    assert roll.num_leaves == 8
    roll.logp_old[roll.parent >= 0] = torch.tensor([v for lv in BRANCH_EDGE_LOGPS for v in lv])
    adv = algo.advantages(BATCH, roll, RewardOutput(torch.tensor(BRANCH_REWARDS)))
    close(adv.edge[roll.parent >= 0], expected)
    close(adv.leaf, expected[-8:])


BRANCH_ADV_CHAIN = [0.70710677, -0.70710677, 0.70710677, -0.70710677, -0.33646328, 1.17762148, -1.17762148,
                    0.33646328, -0.33646328, 1.17762148, -1.17762148, 0.33646328]


def test_branchgrpo_prob_weighted_with_chains_below_the_splits(fixed_noise):
    """Prob-weighting where a split's children continue as single-child chains (the recipe's steps after
    each split, and after the last split down to the leaves): a lone child passes its reward up unchanged,
    the split node takes the softmax of its children's edge log-probs, as compute_node_rewards_from_leaves."""
    algo = _branch({"split_points": (0, 2), "prob_weighted": True}, 4)
    roll = RolloutEngine(ToyPolicy(), schedule="linspace", shift=3.0).run(algo.plan(0), BATCH, 0)
    assert roll.parent.tolist() == BRANCH_CHAIN_PARENT
    roll.logp_old[roll.parent >= 0] = torch.tensor(BRANCH_CHAIN_LOGPS[1:])
    adv = algo.advantages(BATCH, roll, RewardOutput(torch.tensor(BRANCH_CHAIN_REWARDS)))
    close(adv.edge[roll.parent >= 0], BRANCH_ADV_CHAIN)


# ---- BranchGRPO: the update loop of train_one_step_tree (one forward per edge, loss / (GA x edges per tree)) -
BRANCH_UPDATE_W = [0.05156250, 0.04054215, 0.01178800]
BRANCH_UPDATE_LOSS = [-0.07500000, 0.04375000, -0.02500000, 0.09375000, -0.05510173, -0.00643750, 0.01818750,
                      -0.11587500, 0.05228029]


class _OneWeight:
    """A one-weight "model" for the update loop: the edge into node n has log-prob logp_old[n] + w c[n]."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.calls: list[list[int]] = []
        self.steps: list[float] = []

    def trainable_parameters(self):
        return [self.w]

    def logp(self, rollout, nodes, reference=False, share_parents=True):
        from bench.engine.rollout import EdgeEval

        nodes = torch.as_tensor(nodes)
        self.calls.append(nodes.tolist())
        c = torch.tensor([0.0, 0.0] + BRANCH_UPDATE_C, dtype=torch.float64)[nodes]
        lp = rollout.logp_old[nodes].double() + self.w * c
        M = nodes.numel()
        return EdgeEval(log_prob=lp, mean=torch.zeros(M, 1, 1, 1), std=torch.ones(M),
                        nfe=int(torch.unique(rollout.parent[nodes]).numel()) if share_parents else M)


@pytest.mark.parametrize("update", ["reference", "shared_parent"])
def test_branchgrpo_update_loop_matches_train_one_step_tree(update):
    from types import SimpleNamespace

    # two roots (0, 1); nodes 2..10 are the trained edges' children, in training order; siblings share parents
    parent = torch.tensor([-1, -1, 0, 0, 1, 1, 2, 2, 4, 4, 3])
    roll = SimpleNamespace(parent=parent, logp_old=torch.linspace(-1.0, 1.0, 11), iteration=0,
                           trainable=parent >= 0, plan=SimpleNamespace(cfg_factor=lambda: 1))
    adv = torch.tensor([float("nan")] * 2 + BRANCH_UPDATE_ADV)
    algo = BranchGRPO(BranchGRPOConfig(split_points=(0,), clip_range=0.03, adv_clip_max=1.8, grad_accum=4,
                                       update=update),
                      SamplerSpec(steps=3, guidance=1.0, noise_level=0.7),
                      TrainSpec(micro_batch=64, optimizer_steps=3, max_grad_norm=0.0))
    algo._trained_edges = lambda rollout, a: torch.arange(2, 11)  # the shuffled order, fixed
    model = _OneWeight()
    opt = torch.optim.SGD([model.w], lr=0.5)
    seen = []
    step = opt.step

    def record():
        step()
        seen.append(float(model.w.detach()))
    opt.step = record
    st = algo.update(model, model, opt, roll, SimpleNamespace(edge=adv))
    if update == "reference":
        # one forward per trained edge (siblings too), batched within each GA-edge mini-batch
        assert model.calls == [[2, 3, 4, 5], [6, 7, 8, 9], [10]] and st.nfe == 9
        assert st.optimizer_steps == 3  # ceil(9 / GA)
        close(seen, BRANCH_UPDATE_W)
        # the logged loss is the mean of the unscaled terms: the code's per-sample losses x GA x (9 // 2)
        close([st.loss], [sum(BRANCH_UPDATE_LOSS) * 4 * 4 / 9])
    else:  # one evaluation per distinct parent, the mean loss, train.optimizer_steps steps
        assert st.nfe == int(torch.unique(parent[2:]).numel()) and st.optimizer_steps == 3
        assert len(seen) == 3 and seen[0] != BRANCH_UPDATE_W[0]


# ---- DiffusionNFT: old-policy decay, the dpm2 rollout, the NFT loss ---------------------------------------
NFT_DECAY = [0.00000000, 0.00000000, 0.00000000, 0.00000000, 0.00000000, 0.00000000, 0.00000000, 0.00100000,
             0.07400000, 0.07500000, 0.20000000, 0.50000000, 0.00000000, 0.00000000, 0.00000000, 0.00000000,
             0.93750000, 0.99900000]
NFT_DPM2_FINAL = [-1.81333200, 0.55110934, -2.82666403, -0.46222267, 1.90221874, -1.47555468, 0.88888670,
                  -2.48888662]
NFT_LOSS = {  # (beta, adv_mode) -> (r, per-image loss)
    (1.0, "all"): ([0.7, 0.4, 0.53, 0.0, 1.0, 0.5],
                   [6.48291657, 8.55329237, 8.01128425, 1.35120594, 9.33763504, 0.06744313]),
    (0.1, "all"): ([0.7, 0.4, 0.53, 0.0, 1.0, 0.5],
                   [64.05799815, 85.87540781, 80.05501571, 13.87857702, 91.41614230, 0.67307060]),
    (1.0, "binary"): ([0.6, 0.4, 0.6, 0.4, 0.6, 0.5],
                      [6.44249990, 8.55329237, 8.02455702, 1.38578716, 9.16569449, 0.06744313]),
    (1.0, "positive_only"): ([0.7, 0.5, 0.53, 0.5, 1.0, 0.5],
                             [6.48291657, 8.59460424, 8.01128425, 1.39443246, 9.33763504, 0.06744313]),
}


def test_diffusionnft_old_policy_decay():
    got = [old_policy_decay(step, ty) for ty in (0, 1, 2) for step in (0, 1, 74, 75, 200, 600)]
    close(got, NFT_DECAY)


def test_diffusionnft_dpm2_rollout_with_the_old_policy(fixed_noise):
    sp = SamplerSpec(steps=10, guidance=1.0, noise_level=0.7)
    plan = DiffusionNFT(DiffusionNFTConfig(group_size=2), sp, TrainSpec()).plan(0)
    assert plan.modes == ("dpm2",) * 10 and plan.weights == "old" and not plan.shared_noise
    eng = RolloutEngine(ToyPolicy())
    eng.snapshots.add("old")
    close(eng.run(plan, BATCH, 0).images, NFT_DPM2_FINAL)


@pytest.mark.parametrize("beta,mode", list(NFT_LOSS))
def test_diffusionnft_loss(beta, mode):
    x0 = torch.from_numpy(noise(20, 6)).double()
    eps = torch.from_numpy(noise(21, 6)).double()
    t = torch.tensor(SD3_T10, dtype=torch.float64)[NFT_SIGMA_IDX]
    tt = t.reshape(-1, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * eps
    v = (MODEL_A * xt + MODEL_B * tt).requires_grad_(True)
    v_old = MODEL_A_OLD * xt + MODEL_B * tt
    r = optimality_probability(torch.tensor(NFT_ADVANTAGES), 5.0, mode)
    want_r, want_loss = NFT_LOSS[(beta, mode)]
    close(r, want_r)
    out = nft_loss(v, v_old, x0, xt, t, r.double(), beta, 5.0)
    close(out.loss.detach(), want_loss)
    out.loss.sum().backward()  # the gradient reaches the trained velocity only
    assert v.grad is not None and bool(torch.isfinite(v.grad).all())
