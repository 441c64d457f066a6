"""The shared rollout engine: executes any ``RolloutPlan`` for a whole prompt batch.

Only the engine calls the denoiser. It

* batches the frontier of every tree across all prompts into one denoiser call per level (chunked so
  that no call exceeds ``max_micro_batch`` rows; a CFG-guided evaluation takes 2 rows: cond + uncond
  are batched together),
* applies the step rule of each level (ODE / SDE with k children from ONE evaluation / DPM-Solver++),
* draws all noise of a level in one call from a generator derived from (seed, iteration, stage), so
  results do not depend on micro-batching,
* counts denoiser forward passes exactly (``nfe_rollout``, ``nfe_update``, ``nfe_eval``; a guided
  evaluation counts 2),
* recomputes log-probs with gradients through *the same* step functions (``logp``), one evaluation
  per distinct parent for all of its children (TreeGRPO's amortisation),
* evaluates the denoiser on latents an algorithm builds itself (``predict``: likelihood-free updates
  such as DiffusionNFT's flow-matching loss on forward-noised samples), with the trained weights, a
  weight snapshot (``bench.model.snapshots``) or the frozen reference; counted as update NFE and traced,
* decodes and scores with gradients for direct-gradient updates (``decode_grad``, ``reward_grad``:
  ReFL, DRaFT-K back-propagate a differentiable reward into the denoiser), traced as
  ``vae_decode_backward`` / ``reward_backward`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.engine import sde
from bench.engine.seeding import generator
from bench.engine.trace import CallRecorder
from bench.model.policy import Conditioning, Policy
from bench.model.snapshots import CURRENT, REFERENCE, WeightSnapshots
from bench.types import PromptBatch, Rollout, RolloutPlan


@dataclass(frozen=True)
class EdgeEval:
    """Recomputed statistics of M edges parent(n) -> n.

    log_prob [M] (with gradients), mean [M, C, h, w], std [M]; nfe: denoiser forward passes spent."""

    log_prob: Tensor
    mean: Tensor
    std: Tensor
    nfe: int = 0


@dataclass(frozen=True)
class Prediction:
    """Model output [B, C, h, w] of ``RolloutEngine.predict`` (with gradients for the trained weights) and
    the denoiser forward passes it spent."""

    out: Tensor
    nfe: int


@dataclass(frozen=True)
class Schedule:
    """Per-level schedule of a rollout: ``levels`` [T+1] (sigmas for flow models, alpha_bar for
    epsilon models) and ``timesteps`` [T] (what the denoiser sees at step i)."""

    levels: Tensor
    timesteps: Tensor


class _Nodes:
    """The nodes of a growing rollout, level by level; ids are assigned in frontier order (the roots
    0..P*G-1, then each level's children in the order of their parents)."""

    def __init__(self, x: Tensor, P: int, G: int, keep_means: bool = False):
        n0 = P * G
        self.lat, self.parent, self.level = [x], [torch.full((n0,), -1)], [torch.zeros(n0, dtype=torch.long)]
        self.mean = [torch.full_like(x, float("nan"))] if keep_means else None
        self.prompt, self.tree = [torch.arange(P).repeat_interleave(G)], [torch.arange(n0)]
        self.logp, self.train = [torch.full((n0,), float("nan"))], [torch.zeros(n0, dtype=torch.bool)]
        self.front_ids, self.front_prompt, self.front_tree = torch.arange(n0), self.prompt[0], self.tree[0]
        self.next_id = n0

    def grow(self, x: Tensor, level: int, k: int, log_prob: Tensor | None, mean: Tensor | None = None) -> None:
        """Add the new frontier x [F * k, ...] at ``level``: k children per frontier node; ``log_prob``
        [F * k] for stochastic (trainable) edges, None for deterministic ones; ``mean`` [F * k, ...] the
        step's mean (kept when the plan asks for means)."""
        F2 = x.shape[0]
        rep = (lambda t: t.repeat_interleave(k)) if k > 1 else (lambda t: t)
        self.lat.append(x)
        if self.mean is not None:
            self.mean.append(mean.to(x.dtype) if mean is not None else torch.full_like(x, float("nan")))
        self.parent.append(rep(self.front_ids))
        self.level.append(torch.full((F2,), level, dtype=torch.long))
        self.front_prompt, self.front_tree = rep(self.front_prompt), rep(self.front_tree)
        self.prompt.append(self.front_prompt)
        self.tree.append(self.front_tree)
        self.logp.append(log_prob.float().cpu() if log_prob is not None else torch.full((F2,), float("nan")))
        self.train.append(torch.full((F2,), log_prob is not None, dtype=torch.bool))
        self.front_ids = torch.arange(self.next_id, self.next_id + F2)
        self.next_id += F2

    def rollout(self, plan: RolloutPlan, images: Tensor, sched: "Schedule", nfe: int, iteration: int,
                cond: Conditioning, batch: PromptBatch | None = None) -> Rollout:
        return Rollout(latents=torch.cat(self.lat) if plan.keep_latents else None, parent=torch.cat(self.parent),
                       level=torch.cat(self.level), prompt=torch.cat(self.prompt), tree=torch.cat(self.tree),
                       logp_old=torch.cat(self.logp), trainable=torch.cat(self.train), leaves=self.front_ids,
                       images=images, sigmas=sched.levels.clone(), timesteps=sched.timesteps.clone(), nfe=nfe,
                       plan=plan, iteration=iteration, conditioning=cond, batch=batch,
                       means=torch.cat(self.mean) if self.mean is not None else None)


class RolloutEngine:
    def __init__(self, policy: Policy, *, max_micro_batch: int = 64, seed: int = 0, shift: float = 1.0,
                 schedule: str = "scheduler"):
        """``schedule`` (flow models): "scheduler" = the policy's own scheduler config's
        ``set_timesteps`` sigmas; "linspace" = the FLUX trainers' shifted linspace with ``shift`` and
        quantised timesteps (``bench.engine.sde.FLOW_SCHEDULES``)."""
        if max_micro_batch < 1:
            raise ValueError("max_micro_batch must be >= 1")
        if schedule not in sde.FLOW_SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(sde.FLOW_SCHEDULES)}")
        self.policy = policy
        self.max_micro_batch = int(max_micro_batch)
        self.seed = int(seed)
        self.shift = float(shift)
        self.schedule_kind = schedule
        self.nfe_rollout = 0
        self.nfe_update = 0
        self.nfe_eval = 0
        #: every expensive call this engine makes (bench.engine.trace); the runner drains it per iteration
        self.recorder = CallRecorder()
        #: the training reward, attached by the runner for algorithms that declare ``reward_gradient``
        #: (direct-gradient updates call it through ``reward_grad``); None otherwise
        self.reward: object | None = None
        #: named copies of the trainable weights an algorithm samples or evaluates with (bench.model.snapshots)
        self.snapshots = WeightSnapshots(lambda: policy.named_trainable_parameters(),
                                         lambda: getattr(policy, "denoiser", None))

    # ---- schedules -----------------------------------------------------------------------------
    def schedule(self, plan: RolloutPlan) -> Schedule:
        T = plan.num_steps
        if self.policy.prediction == "flow":
            n_train = int(getattr(self.policy.scheduler.config, "num_train_timesteps", 1000))
            if plan.sigmas is not None:
                levels = torch.tensor(plan.sigmas, dtype=torch.float32)
                return Schedule(levels, sde.schedule_timesteps(self.schedule_kind, levels[:T], n_train))
            fs = sde.flow_schedule(self.schedule_kind, T, self.shift, dict(self.policy.scheduler.config), n_train)
            return Schedule(fs.sigmas, fs.timesteps)
        if plan.sigmas is not None:
            raise ValueError("explicit sigma schedules are only supported for flow models")
        if any(m == "dpm2" for m in plan.modes):
            raise ValueError("DPM-Solver++ steps are only supported for flow models")
        levels, ts = self.policy.ddim_alpha_bars(T)
        return Schedule(levels, ts)

    # ---- denoiser evaluation -------------------------------------------------------------------
    def _evaluate(self, x: Tensor, timesteps: Tensor, prompt_idx: Tensor, cond: Conditioning,
                  guidance: float, phase: str = "rollout", role: str = "policy",
                  uncond_grad: bool = True) -> tuple[Tensor, int]:
        """Guided model output for rows x [B, ...] (one call; the caller chunks). Returns (out, nfe).
        ``uncond_grad=False`` detaches the unconditional branch of a guided output."""
        B = x.shape[0]
        per = 2 if guidance > 1.0 else 1  # rows per evaluated latent (cond + uncond with CFG)
        self.recorder.denoiser(per * B, phase=phase, grad=torch.is_grad_enabled(), role=role, per_eval=per,
                               checkpointing=self.policy.options.gradient_checkpointing)
        if guidance > 1.0:
            empty = self.policy.empty_conditioning()
            c = Conditioning.cat([empty.take(torch.zeros(B, dtype=torch.long)), cond.take(prompt_idx)])
            out = self.policy.predict(torch.cat([x, x]), torch.cat([timesteps, timesteps]), c)
            uncond, text = out.chunk(2)
            if not uncond_grad:
                uncond = uncond.detach()
            return uncond + guidance * (text - uncond), 2 * B
        return self.policy.predict(x, timesteps, cond.take(prompt_idx)), B

    @torch.no_grad()
    def _evaluate_chunked(self, x: Tensor, timesteps: Tensor, prompt_idx: Tensor, cond: Conditioning,
                          guidance: float, phase: str = "rollout") -> tuple[Tensor, int]:
        rows = max(1, self.max_micro_batch // (2 if guidance > 1.0 else 1))
        outs, nfe = [], 0
        for s in range(0, x.shape[0], rows):
            o, n = self._evaluate(x[s:s + rows], timesteps[s:s + rows], prompt_idx[s:s + rows], cond, guidance,
                                  phase)
            outs.append(o)
            nfe += n
        return torch.cat(outs), nfe

    def _step(self, mode: str, plan: RolloutPlan, out: Tensor, x: Tensor, lvl: Tensor, sched: Schedule,
              prev_sample: Tensor | None = None, gen: torch.Generator | None = None) -> sde.StepOutput:
        """Apply the step rule of ``mode`` to rows whose latents sit at levels ``lvl`` [B]."""
        a, b = sched.levels[lvl].to(x.device), sched.levels[lvl + 1].to(x.device)
        if self.policy.prediction == "epsilon":
            eta = plan.noise_level if mode == "sde" else 0.0
            return sde.ddim_step(out, x, a, b, eta, prev_sample=prev_sample, generator=gen)
        if mode == "ode":
            return sde.flow_ode_step(out, x, a, b)
        if mode == "sde":
            if plan.sde_type == "flow_grpo":
                return sde.flow_sde_step(out, x, a, b, plan.noise_level, prev_sample=prev_sample, generator=gen,
                                         log_std_range=plan.log_std_range)
            if plan.sde_type == "cps":
                return sde.cps_sde_step(out, x, a, b, plan.noise_level, prev_sample=prev_sample, generator=gen)
            return sde.dance_sde_step(out, x, a, b, plan.noise_level, prev_sample=prev_sample, generator=gen)
        raise ValueError(f"mode {mode!r} has no single-step rule")

    def _split_step(self, mode: str, plan: RolloutPlan, out: Tensor, x: Tensor, lvl: Tensor, sched: Schedule,
                    gen: torch.Generator) -> sde.StepOutput:
        """A branching step whose children are drawn with ``plan.split_noise_scale`` times the step's
        noise (BranchGRPO's ``flux_step_with_split``) and scored per ``plan.split_logp_std``."""
        probe = self._step(mode, plan, out, x, lvl, sched, prev_sample=x)  # mean and std of the step
        std = probe.std.reshape(-1, *([1] * (x.dim() - 1))).to(probe.mean.device)
        z = torch.randn(probe.mean.shape, generator=gen, device=gen.device, dtype=torch.float32)
        nxt = probe.mean + plan.split_noise_scale * std * z.to(probe.mean.device)
        st = self._step(mode, plan, out, x, lvl, sched, prev_sample=nxt)
        return self._rescore_split(plan, st, nxt, torch.ones(x.shape[0], dtype=torch.bool))

    @staticmethod
    def _rescore_split(plan: RolloutPlan, st: sde.StepOutput, nxt: Tensor, split_rows: Tensor) -> sde.StepOutput:
        """With ``split_logp_std="sampling"``, the log-prob of the rows drawn at a branching step under
        the std they were drawn with (scale * std); otherwise ``st`` unchanged."""
        if plan.split_logp_std != "sampling" or plan.split_noise_scale == 1.0 or not bool(split_rows.any()):
            return st
        scale = torch.where(split_rows.to(st.std.device), plan.split_noise_scale, 1.0).to(st.std.dtype)
        std = (st.std * scale).reshape(-1, *([1] * (nxt.dim() - 1)))
        # CPS's log-prob carries no std (its released code drops the variance scale): nothing to rescore
        lp = st.log_prob if plan.sde_type == "cps" else sde.gaussian_log_prob(nxt, st.mean, std)
        return sde.StepOutput(prev_sample=st.prev_sample, log_prob=lp, mean=st.mean, std=st.std * scale)

    # ---- rollout -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, plan: RolloutPlan, batch: PromptBatch, iteration: int, *, stage: str = "rollout",
            conditioning: Conditioning | None = None, seed: int | None = None) -> Rollout:
        """Sample the plan for every prompt of the batch. ``stage`` names the noise stream and the NFE
        counter ("rollout" -> nfe_rollout, "eval" -> nfe_eval). ``seed`` replaces the engine's seed for
        this call's noise (the held-out evaluation draws from ``eval.seed``, not the run seed, so every
        run of a comparison evaluates on the same noise)."""
        pol = self.policy
        P = len(batch)
        sched = self.schedule(plan)
        phase = "eval" if stage == "eval" else "rollout"
        if conditioning is None:
            self.recorder.record("text_encode", P, phase, "text_encoder")
        cond = conditioning if conditioning is not None else pol.encode_prompts(batch.prompts)
        gen = generator(self.seed if seed is None else int(seed), iteration, stage)
        x = self._initial_noise(plan, P, gen)
        nodes = _Nodes(x, P, plan.trees_per_prompt, plan.keep_means)
        prev_x0: Tensor | None = None  # data prediction of the frontier's parents (DPM multistep)
        new_x0: Tensor | None = None
        nfe = 0
        with self.snapshots.use(plan.weights):  # the trained weights, or the snapshot the plan names
            for i in range(plan.num_steps):
                t = sched.timesteps[i].expand(x.shape[0])
                out, n = self._evaluate_chunked(x, t, nodes.front_prompt, cond, plan.guidance, phase)
                nfe += n
                st, new_x0 = self._advance(plan, i, out, x, sched, prev_x0, gen)
                x = st.prev_sample
                sde_step = plan.modes[i] == "sde"
                nodes.grow(x, i + 1, plan.branch[i], st.log_prob if sde_step else None, st.mean if sde_step else None)
                prev_x0 = new_x0  # aligned with the new frontier (expanded before the step when k > 1)
        # "x0": the data prediction of the last evaluation (DanceGRPO decodes ``pred_original`` of its
        # last step); new_x0 is aligned with the leaves. A last ODE step to sigma = 0 gives the same latent.
        images = self._decode(new_x0 if plan.final_image == "x0" else x, phase)
        if stage == "eval":
            self.nfe_eval += nfe
        else:
            self.nfe_rollout += nfe
        return nodes.rollout(plan, images, sched, nfe, iteration, cond, batch)

    def _initial_noise(self, plan: RolloutPlan, P: int, gen: torch.Generator) -> Tensor:
        """Root latents [P * G, ...]: one noise per prompt shared by its G roots, or one per root."""
        G, shape = plan.trees_per_prompt, self.policy.latent_shape
        if plan.shared_noise:  # never shared across prompts
            x = torch.randn((P, *shape), generator=gen).repeat_interleave(G, dim=0)
        else:
            x = torch.randn((P * G, *shape), generator=gen)
        return x.to(self.policy.device)

    def _advance(self, plan: RolloutPlan, i: int, out: Tensor, x: Tensor, sched: Schedule, prev_x0: Tensor | None,
                 gen: torch.Generator) -> tuple[sde.StepOutput, Tensor | None]:
        """Step i for the frontier x [F, ...] with model output ``out``: (the step, the data prediction
        aligned with the new frontier). A branching step (k > 1) repeats each row k times first, so the k
        children of a parent share its one evaluation."""
        mode, k = plan.modes[i], plan.branch[i]
        if mode == "dpm2":
            s_prev = sched.levels[i - 1] if (i > 0 and prev_x0 is not None) else None
            st = sde.flow_dpm2_step(out, x, sched.levels[i], sched.levels[i + 1],
                                    prev_x0=prev_x0 if s_prev is not None else None, sigma_prev=s_prev)
            return st, st.x0
        lvl = torch.full((x.shape[0],), i, dtype=torch.long)
        if k > 1:
            out, x, lvl = out.repeat_interleave(k, 0), x.repeat_interleave(k, 0), lvl.repeat_interleave(k)
        if k > 1 and plan.split_noise_scale != 1.0:  # BranchGRPO's scaled split noise
            st = self._split_step(mode, plan, out, x, lvl, sched, gen)
        else:
            st = self._step(mode, plan, out, x, lvl, sched, gen=gen)
        lv = sched.levels[i].to(x.device)
        x0 = (x - lv * out) if self.policy.prediction == "flow" else (x - torch.sqrt(1 - lv) * out) / torch.sqrt(lv)
        return st, x0

    def _decode(self, x: Tensor, phase: str) -> Tensor:
        """Images [L, 3, H, W] of latents x [L, ...], decoded in chunks of at most max_micro_batch."""
        parts = []
        for s in range(0, x.shape[0], self.max_micro_batch):
            chunk = x[s:s + self.max_micro_batch]
            if self.policy.vae is not None:  # pixel-space models have no decoder to call
                self.recorder.record("vae_decode", chunk.shape[0], phase, "vae")
            parts.append(self.policy.decode(chunk))
        return torch.cat(parts).float().cpu()

    # ---- log-probs with gradients --------------------------------------------------------------
    def logp(self, rollout: Rollout, nodes: Tensor, *, reference: bool = False,
             share_parents: bool = True) -> EdgeEval:
        """Log-probs of the edges parent(n) -> n for child nodes ``nodes`` [M], with gradients through
        the denoiser. One (guided) evaluation per distinct parent serves all of its children; the NFE
        go to ``nfe_update``. ``share_parents=False``: one evaluation per edge, siblings too (the cost of
        trainers that loop over transitions, BranchGRPO's). With ``plan.cfg_uncond_grad`` False the guided
        output's unconditional branch carries no gradient. ``reference=True`` evaluates the frozen reference (``policy.reference()``)
        without gradients (for the KL term)."""
        if rollout.latents is None:
            raise ValueError("rollout was sampled with keep_latents=False; log-probs cannot be recomputed")
        plan = rollout.plan
        nodes = torch.as_tensor(nodes, dtype=torch.long)
        par = rollout.parent[nodes]
        if bool((par < 0).any()):
            raise ValueError("roots have no incoming edge")
        lvl = rollout.level[par]
        modes = {plan.modes[int(i)] for i in lvl.unique()}
        if modes - {"sde"}:
            raise ValueError(f"log-probs exist only for SDE edges; got edges from {sorted(modes)} steps")
        if share_parents:
            uniq, inv = torch.unique(par, return_inverse=True)
        else:
            uniq, inv = par, torch.arange(par.numel())
        sched = Schedule(rollout.sigmas, rollout.timesteps)
        lat = rollout.latents
        dev = self.policy.device
        x_u = lat[uniq.to(lat.device)].to(dev)
        t_u = sched.timesteps[rollout.level[uniq]]
        p_u = rollout.prompt[uniq]
        if reference:
            with torch.no_grad(), self.policy.reference():
                out_u, n = self._evaluate(x_u, t_u, p_u, rollout.conditioning, plan.guidance, "update", "reference")
        else:
            out_u, n = self._evaluate(x_u, t_u, p_u, rollout.conditioning, plan.guidance, "update",
                                      uncond_grad=plan.cfg_uncond_grad)
        self.nfe_update += n
        inv = inv.to(dev)
        nxt = lat[nodes.to(lat.device)].to(dev)
        st = self._step("sde", plan, out_u[inv], x_u[inv], lvl, sched, prev_sample=nxt)
        st = self._rescore_split(plan, st, nxt, torch.tensor([plan.branch[int(i)] > 1 for i in lvl.tolist()]))
        return EdgeEval(log_prob=st.log_prob, mean=st.mean, std=st.std, nfe=n)

    # ---- model outputs at given latents (likelihood-free updates) -------------------------------
    def predict(self, rollout: Rollout, x: Tensor, step: Tensor, prompt: Tensor, *, weights: str = CURRENT,
                guidance: float = 1.0) -> Prediction:
        """Model output at latents x [B, C, h, w] that sit at the noise level of step ``step`` [B] (an index
        into ``rollout.timesteps``), for the rollout's prompts ``prompt`` [B], in one call (the caller
        chunks). ``weights``: "current" (the trained weights; with gradients when grad mode is on), a
        snapshot name or "reference" (the frozen base under LoRA), both without gradients.
        ``guidance`` > 1 evaluates the CFG-guided output (2 rows per latent). The NFE go to
        ``nfe_update`` and the call is traced in the update phase."""
        step = torch.as_tensor(step, dtype=torch.long).cpu()
        prompt = torch.as_tensor(prompt, dtype=torch.long)
        if x.shape[0] != step.numel() or x.shape[0] != prompt.numel():
            raise ValueError(f"predict: {x.shape[0]} latents, {step.numel()} steps, {prompt.numel()} prompts")
        t = rollout.timesteps[step]
        x = x.to(self.policy.device)
        if weights == CURRENT:
            out, n = self._evaluate(x, t, prompt, rollout.conditioning, guidance, "update")
        elif weights == REFERENCE:
            with torch.no_grad(), self.policy.reference():
                out, n = self._evaluate(x, t, prompt, rollout.conditioning, guidance, "update", "reference")
        else:
            with torch.no_grad(), self.snapshots.use(weights):
                out, n = self._evaluate(x, t, prompt, rollout.conditioning, guidance, "update")
        self.nfe_update += n
        return Prediction(out=out, nfe=n)

    # ---- decoding and scoring with gradients (direct-gradient updates) ---------------------------
    def attach_reward(self, reward: object) -> None:
        """The reward ``reward_grad`` calls: one with ``differentiable = True`` and a ``score_grad``
        method (``rewards._common.LazyReward.score_grad``); the runner checks that before training."""
        if not getattr(reward, "differentiable", False) or not callable(getattr(reward, "score_grad", None)):
            name = getattr(reward, "name", type(reward).__name__)
            raise ValueError(f"reward {name!r} has no gradient path (differentiable = True and score_grad)")
        self.reward = reward

    def decode_grad(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] of latents x [B, ...] with the autograd graph kept (one call, the
        caller chunks); traced as ``vae_decode_backward`` when the policy has a VAE."""
        if self.policy.vae is not None:
            self.recorder.record("vae_decode_backward", x.shape[0], "update", "vae", grad=True)
        return self.policy.decode(x, grad=True)

    def reward_grad(self, rollout: Rollout, images: Tensor, leaves: Tensor) -> Tensor:
        """Scores [B] float32 of images [B, 3, H, W] (with their graph) for the rollout's leaves ``leaves``
        [B] (indices into ``rollout.leaves``: the prompt and metadata of each image), differentiable back
        to ``images``; traced as ``reward_backward``."""
        if self.reward is None:
            raise RuntimeError("reward_grad needs a reward attached with attach_reward (the runner does it for "
                               "algorithms that declare reward_gradient = True)")
        if rollout.batch is None:
            raise ValueError("reward_grad needs the rollout's PromptBatch (rollout.batch)")
        leaves = torch.as_tensor(leaves, dtype=torch.long).cpu()
        if images.shape[0] != leaves.numel():
            raise ValueError(f"reward_grad: {images.shape[0]} images for {leaves.numel()} leaves")
        idx = rollout.prompt[rollout.leaves[leaves]].tolist()
        name = str(getattr(self.reward, "name", type(self.reward).__name__))
        self.recorder.record("reward_backward", images.shape[0], "update", name, grad=True)
        b = rollout.batch
        scores = self.reward.score_grad(images, [b.prompts[i] for i in idx],  # type: ignore[attr-defined]
                                        [b.metadata[i] for i in idx])
        return scores.float()
