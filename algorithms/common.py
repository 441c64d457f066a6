"""Small pure functions shared by the algorithms (each has known-answer tests).

Nothing here knows which algorithm calls it; algorithms never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.types import Rollout, TrainSpec, UpdateStats


def group_normalize(values: Tensor, group_ids: Tensor, unbiased: bool, eps: float) -> Tensor:
    """(v - mean_g) / (std_g + eps) within each group (GRPO advantage, ALGORITHMS.md §2.2 / §4.2).

    values [L] float, group_ids [L] long. ``unbiased`` selects torch's ddof=1 std (DanceGRPO,
    MixGRPO) or the population std (TreeGRPO, Flow-GRPO). A group of one element gets advantage 0
    (its unbiased std is undefined)."""
    values = values.float()
    out = torch.zeros_like(values)
    for g in torch.unique(group_ids):
        m = group_ids == g
        v = values[m]
        if v.numel() < 2:
            continue
        out[m] = (v - v.mean()) / (v.std(unbiased=unbiased) + eps)
    return out


@dataclass(frozen=True)
class PPOTerms:
    """Per-edge PPO quantities: loss [M] (with gradients), ratio [M], clipped [M] bool."""

    loss: Tensor
    ratio: Tensor
    clipped: Tensor


def ppo_clip_loss(logp_new: Tensor, logp_old: Tensor, adv: Tensor, clip_range: float,
                  adv_clip_max: float) -> PPOTerms:
    """PPO clipped surrogate per edge (Schulman et al. 2017, eq. 7, as a loss to minimise):
    max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r = exp(logp_new - logp_old) and A clamped to
    [-adv_clip_max, adv_clip_max] (every reference repo clamps at 5)."""
    a = adv.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return PPOTerms(loss=torch.maximum(unclipped, clipped), ratio=ratio.detach(),
                    clipped=((ratio.detach() - 1.0).abs() > clip_range))


def gaussian_mean_kl(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) averaged over latent dims: ||mu - mu_ref||^2 / (2 std^2)
    per edge [M] (Flow-GRPO's KL term; its code divides by the noise scale without the sqrt(-dt)
    factor, treebench uses the step std of the transition, which is the paper's Gaussian KL)."""
    d = ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.dim())))
    return d / (2 * std**2)


def chain_edge_advantages(rollout: Rollout, leaf_adv: Tensor) -> Tensor:
    """Broadcast each leaf's advantage along its chain: [N] (NaN at roots and on nodes that lead to
    several leaves, which chain rollouts never have)."""
    owner = rollout.leaf_of_node()
    out = torch.full((rollout.num_nodes,), float("nan"))
    ok = (owner >= 0) & (rollout.parent >= 0)
    out[ok] = leaf_adv.float()[owner[ok]]
    return out


def ppo_update(policy: Any, engine: Any, optimizer: Any, rollout: Rollout, edges: Tensor, adv: Tensor, *,
               train: TrainSpec, clip_range: float, adv_clip_max: float, beta: float = 0.0,
               reduction: str = "mean") -> UpdateStats:
    """Run the PPO-clip update on the given edges.

    edges [M]: child node ids of the trained edges, in training order (the caller shuffles). Edges
    sharing a parent are evaluated together: one denoiser evaluation serves all of a parent's
    children. The parents are split into ``train.optimizer_steps`` mini-batches (one optimizer step
    each); a mini-batch is processed in micro-batches of at most ``train.micro_batch`` denoiser rows
    (a guided parent takes 2) whose gradients accumulate.

    reduction: "mean" -> the mini-batch loss is the mean over its edge terms (DDPO/DanceGRPO/MixGRPO);
    "sum_children" -> sum over each parent's children, mean over parents (TreeGRPO's loss_agg "sum").
    """
    edges = torch.as_tensor(edges, dtype=torch.long)
    adv = adv.float()
    if edges.numel() == 0:
        return UpdateStats(loss=0.0, approx_kl=0.0, clip_frac=0.0, grad_norm=0.0, first_ratio=1.0, edges=0,
                           optimizer_steps=0, micro_batches=0)
    if reduction not in ("mean", "sum_children"):
        raise ValueError(f"unknown reduction {reduction!r}")
    params = policy.trainable_parameters()
    parents = rollout.parent[edges]
    # unique parents in first-appearance order, so the caller's shuffle decides the order
    order: dict[int, list[int]] = {}
    for j, p in enumerate(parents.tolist()):
        order.setdefault(p, []).append(j)
    groups = list(order.values())
    n_steps = max(1, min(train.optimizer_steps, len(groups)))
    cfg = rollout.plan.cfg_factor()
    per_micro = max(1, train.micro_batch // cfg)

    tot_loss = tot_kl = tot_akl = tot_clip = 0.0
    n_terms = 0
    first_ratio: float | None = None
    grad_norm = 0.0
    micro_batches = 0
    bounds = torch.linspace(0, len(groups), n_steps + 1).round().long().tolist()
    for s in range(n_steps):
        mb = groups[bounds[s]:bounds[s + 1]]
        if not mb:
            continue
        m_edges = sum(len(g) for g in mb)
        denom = float(m_edges if reduction == "mean" else len(mb))
        optimizer.zero_grad(set_to_none=True)
        for c in range(0, len(mb), per_micro):
            idx = torch.tensor([j for g in mb[c:c + per_micro] for j in g], dtype=torch.long)
            e = edges[idx]
            ev = engine.logp(rollout, e)
            old = rollout.logp_old[e].to(ev.log_prob.device)
            terms = ppo_clip_loss(ev.log_prob, old, adv[idx].to(ev.log_prob.device), clip_range, adv_clip_max)
            loss = terms.loss.sum() / denom
            if beta > 0:
                ref = engine.logp(rollout, e, reference=True)
                kl = gaussian_mean_kl(ev.mean, ref.mean.detach(), ev.std.detach())
                loss = loss + beta * kl.sum() / denom
                tot_kl += float(kl.detach().sum())
            loss.backward()
            micro_batches += 1
            if first_ratio is None:
                first_ratio = float(terms.ratio.mean())
            tot_loss += float(terms.loss.detach().sum())
            tot_akl += float((0.5 * (ev.log_prob.detach() - old) ** 2).sum())
            tot_clip += float(terms.clipped.float().sum())
            n_terms += int(e.numel())
        if train.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        optimizer.step()
    return UpdateStats(loss=tot_loss / n_terms, approx_kl=tot_akl / n_terms, clip_frac=tot_clip / n_terms,
                       grad_norm=grad_norm, first_ratio=first_ratio if first_ratio is not None else 1.0,
                       edges=n_terms, optimizer_steps=n_steps, micro_batches=micro_batches,
                       kl=tot_kl / n_terms)
