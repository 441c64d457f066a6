"""Golden trajectories: every algorithm, 2 iterations on the tiny in-process models (fixed weights, seed 0).

``tests/test_golden.py`` re-runs each case through the real runner and compares what it logs (rewards, loss,
KL, gradient norm, first importance ratio, NFE) and what a probe sees inside the update (the trained edges'
advantages and sampling log-probs, the clipped fraction, the change of the weights) with
``tests/golden.json``, so a silent change of the numerics fails. Keys that do not apply to a case are null
(a likelihood-free algorithm has no importance ratio; a loss other than ``ppo_clip_loss`` gives the probe
no terms) and null must stay null. When a change of the numbers is intended,
regenerate the file on purpose and commit it with the change that explains it:

    .venv/bin/python tests/golden.py --regenerate

``--check`` prints the differences without writing, and for every key the largest |got - golden| /
tolerance seen (1.0 = at the tolerance).

The numbers must hold on any CPU PyTorch supports (x86-64 with or without AVX2/AVX-512, arm64) and any
intra-op thread count: the tolerances below are derived from each quantity's scale and float32 rounding,
never from one machine's digits (see ``TOLERANCE``). ``.ci/run`` checks that by re-running the golden and
parity tests with float32 rounding perturbed (``ATEN_CPU_CAPABILITY``, thread count, tiny models rebuilt).
The runs use ``TREEBENCH_TEST_THREADS`` intra-op threads (default 1).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "golden.json"

#: per case: algorithm, model and settings (small: a few seconds each on one CPU thread)
CASES: dict[str, dict[str, Any]] = {
    "grpo": {"algo": "grpo", "sets": {"algo.group_size": 2}},
    "ddpo": {"algo": "ddpo", "sets": {"algo.group_size": 2, "algo.min_count": 2, "algo.buffer_size": 4}},
    "ddpo-ddim": {"algo": "ddpo", "model": "tiny-random-ddim", "sets": {"algo.group_size": 2}},
    "dancegrpo": {"algo": "dancegrpo", "sets": {"algo.group_size": 3}},
    "dancegrpo-dance-sde": {"algo": "dancegrpo", "sets": {"algo.group_size": 3, "sampler.sde": "dance",
                                                          "sampler.noise_level": 0.3,
                                                          "sampler.schedule": "linspace", "sampler.shift": 3.0}},
    "mixgrpo": {"algo": "mixgrpo", "sets": {"algo.group_size": 3, "algo.window": 2, "algo.shift_interval": 1}},
    "mixgrpo-flash": {"algo": "mixgrpo", "sets": {"algo.group_size": 3, "algo.window": 2, "algo.flash": True,
                                                  "algo.compress_ratio": 0.5, "sampler.steps": 6}},
    "treegrpo": {"algo": "treegrpo", "sets": {"algo.k": 2, "algo.d": 2}},
    "treegrpo-softmax": {"algo": "treegrpo", "sets": {"algo.k": 3, "algo.d": 2,
                                                      "algo.weighting": "softmax_logprob"}},
    "flowgrpo": {"algo": "flowgrpo", "sets": {"algo.group_size": 3, "algo.global_std": False}},
    "flowgrpo-fast": {"algo": "flowgrpo", "sets": {"algo.group_size": 3, "algo.sde_window_size": 1,
                                                   "sampler.steps": 6}},
    "branchgrpo": {"algo": "branchgrpo", "sets": {"algo.split_rounds": 2}},
    "branchgrpo-pruned": {"algo": "branchgrpo", "sets": {"algo.split_points": [0, 1], "algo.split_noise_scale": 4.0,
                                                         "algo.prob_weighted": True, "algo.depth_pruning": [4],
                                                         "algo.width_pruning": "global"}},
    "awm": {"algo": "awm", "sets": {"algo.group_size": 3, "algo.train_timesteps": 3, "algo.beta": 1e-3}},
    "refl": {"algo": "refl", "sets": {"algo.group_size": 2, "algo.loss_scale": 1.0}},
    "refl-draft2-ddim": {"algo": "refl", "model": "tiny-random-ddim",
                         "sets": {"algo.group_size": 2, "algo.grad_steps": 2, "algo.stop_steps": [-2, -2],
                                  "algo.solver": "ode", "algo.loss": "negative", "algo.loss_scale": 1.0}},
    "flowdppo": {"algo": "flowdppo", "sets": {"algo.group_size": 3, "algo.num_sde_steps": 2, "sampler.steps": 6}},
    "flowgrpo-cps": {"algo": "flowgrpo", "sets": {"algo.group_size": 3, "sampler.sde": "cps",
                                                  "sampler.noise_level": 0.8}},
    "treegrpo-guard": {"algo": "treegrpo", "sets": {"algo.k": 2, "algo.d": 2, "algo.guard": True}},
}

THREADS_ENV = "TREEBENCH_TEST_THREADS"

# ---- tolerances ---------------------------------------------------------------------------------------
# Every float is compared as |got - golden| <= tol, tol computed per iteration from scales recorded in the
# golden record itself. U is float32's unit roundoff: a float32 result of magnitude m differs from the
# exact value by <= U m per rounding. Two machines differ in how they round (vector width, FMA, reduction
# order and threads, libm, the tiny models' random init drawn by vectorised kernels), so a quantity of
# magnitude m computed through a well-conditioned chain of n roundings may differ by ~ n U m between them;
# where the computation cancels (a difference of nearly equal numbers, a sum of terms of both signs), the
# error scales with the magnitude of the *summands*, not of the result. Each K below is such an n, chosen
# well above what perturbed runs show (their largest |got - golden| / tol is <= 0.05 for every key) (``python tests/golden.py --check`` prints the
# largest |got - golden| / tol per key), so that a different CPU passes and changed math still fails.
U = 2.0 ** -24
#: rewards (brightness: means of decoded pixels) are computed through the whole rollout and decode;
#: perturbed runs differ by <= 2 U |reward| (a few ulps)
K_REWARD = 64
#: a log-prob is the mean over latent dims of  -(x - mu)^2 / (2 std^2) - log std - log sqrt(2 pi);
#: its rounding scales with the mean magnitude of those summands (``logp_scale``); perturbed runs differ by
#: <= 1.5 U scale (the mean over ~10^3 dims adds ~log2(10^3) roundings; x and mu a few ulps each)
K_LOGP = 16
#: group-normalised advantages (r - mean) / std: rewards carry ~K_REWARD U |r| each and the subtraction
#: cancels, so an advantage carries an absolute error of order K U |reward_mean| / reward_std (1/std ~ 100
#: on the tiny models: float32 resolves them to ~1e-5 only). reward_std of the batch stands for the
#: groups' stds (a group can be tighter than the batch; K_ADV = 4 K_REWARD covers that)
K_ADV = 256
#: the weights' change over an iteration (AdamW): each coordinate moves by lr m / (sqrt(v) + eps), of size
#: lr wherever |grad| >> eps and insensitive to the gradient's rounding there; coordinates whose gradient is
#: within rounding of 0 (|grad| ~ eps = 1e-8) move by anything in [0, lr]. PARAM_RTOL bounds the relative
#: change of the norm such coordinates can cause (~ their fraction of all coordinates); perturbed: <= 3e-6
PARAM_RTOL = 1e-4


def _resolutions(g: dict[str, Any]) -> tuple[float, float]:
    """(log-prob resolution, advantage resolution) of one golden iteration record. Without recomputed
    log-probs (likelihood-free and direct-gradient algorithms: ``logp_scale`` null) there is no log-prob
    resolution: 0."""
    d_logp = K_LOGP * U * float(g["logp_scale"]) if g.get("logp_scale") is not None else 0.0
    d_adv = K_ADV * U * abs(float(g["reward_mean"])) / max(float(g["reward_std"]), 1e-12)
    return d_logp, d_adv


def _tol_reward(g: dict[str, Any]) -> float:
    return K_REWARD * U * abs(float(g["reward_mean"]))


def _tol_loss(g: dict[str, Any]) -> float:
    """loss = mean over the n trained edges of max(-A r, -A clip(r)), r = exp(logp - logp_old) ~ 1: the mean
    of terms ~|A| that cancel to ~sum(A) / n (group-normalised: 0 in exact arithmetic) plus the learning
    signal -mean(A (r - 1)) ~ 1e-5. Its error: each A's resolution (the advantages' sum is exact only to
    n d_adv) plus |A| times the log-ratio's (two log-probs: 2 d_logp). At ratio ~1 the tolerance is
    therefore of the loss's own size: the loss is float32 residue there and is held only to its scale;
    the quantities that do not cancel (adv_abs_mean, logp_mean, grad_norm, param_delta, next rewards)
    carry the comparison. Where the loss does not cancel (branchgrpo-pruned keeps an unbalanced subset of
    edges: ~0.03) the tolerance is ~2% of it."""
    d_logp, d_adv = _resolutions(g)
    if g.get("adv_abs_mean") is None:  # a loss the probe does not see (no PPO terms): |A| ~ 1 stands in,
        # plus the loss's own rounding where it does not cancel (a flow-matching or reward loss)
        return d_adv + 2 * d_logp + K_REWARD * U * abs(float(g["loss"]))
    return d_adv + float(g["adv_abs_mean"]) * 2 * d_logp


def _tol_surrogate(g: dict[str, Any]) -> float:
    """surrogate = mean(loss term + A) over the trained edges (the terms from ``ppo_clip_loss`` itself) =
    -mean(A (clip(r) - 1)) on the pessimistic side: the loss without its cancelling part sum(A) / n, i.e.
    the learning and clipping signal (~1e-5). Error: |A| times the log-ratio's 2 d_logp, the advantages'
    d_adv times |r - 1| <= sqrt(2 n kl), and the float32 rounding of each term (U |A|)."""
    d_logp, d_adv = _resolutions(g)
    a = float(g["adv_abs_mean"])
    return a * 2 * d_logp + d_adv * math.sqrt(2 * int(g["edges"]) * abs(float(g["approx_kl"]))) + 2 * U * a


def _tol_kl(g: dict[str, Any]) -> float:
    """approx_kl = mean(d^2) / 2 over the log-ratios d (~1e-4 after one step, ~0 before): d carries
    2 d_logp, so |delta| <= mean|d| 2 d_logp + (2 d_logp)^2 / 2 <= sqrt(2 kl) 2 d_logp + 2 d_logp^2."""
    d_logp, _ = _resolutions(g)
    return math.sqrt(2 * abs(float(g["approx_kl"]))) * 2 * d_logp + 2 * d_logp**2


def _tol_grad(g: dict[str, Any]) -> float:
    """The gradient is linear in the advantages (sum_i A_i grad logp_i, terms of both signs): its norm
    carries their relative resolution d_adv / mean|A| (plus float32 accumulation over the weights, far
    smaller)."""
    _, d_adv = _resolutions(g)
    if g.get("adv_abs_mean") is None:  # no PPO terms seen: |A| ~ 1 (normalised advantages) stands in, and
        # a gradient of the reward itself (direct-gradient updates) carries the rewards' resolution
        return abs(float(g["grad_norm"])) * (d_adv + K_REWARD * U)
    return abs(float(g["grad_norm"])) * d_adv / max(float(g["adv_abs_mean"]), 1e-12)


def _tol_clip(g: dict[str, Any], got: dict[str, Any]) -> float:
    """clip_frac counts edges with |r - 1| > clip_range: an edge within rounding (2 d_logp) of the boundary
    may count on one machine and not on another. ``clip_near`` (recorded by the probe with the same
    resolution) counts those edges; any of them may flip."""
    if g.get("clip_near") is None:  # a surrogate the probe does not see (Guard, Flow-DPPO's mask): one
        # edge at the boundary may flip
        return 1.5 / max(int(g["edges"]), 1)
    near = max(int(g["clip_near"]), int(got.get("clip_near") or 0))
    return (near + 0.5) / max(int(g["edges"]), 1)


#: compared keys and their tolerance (golden record -> absolute tolerance); integers compare exactly
TOLERANCE: dict[str, Callable[[dict[str, Any]], float]] = {
    # rewards: see K_REWARD; the std of rewards ~0.5 has the rewards' absolute resolution
    "reward_mean": _tol_reward,
    "reward_std": _tol_reward,
    "loss": _tol_loss,
    "surrogate": _tol_surrogate,
    "approx_kl": _tol_kl,
    "grad_norm": _tol_grad,
    # the first micro-batch's mean ratio before any update: 1 in exact arithmetic; two log-probs' resolution
    "first_ratio": lambda g: 2 * _resolutions(g)[0],
    # mean |A| over the trained edges: the advantages' absolute resolution (does not cancel: ~0.5 to 1)
    "adv_abs_mean": lambda g: _resolutions(g)[1],
    # mean sampling log-prob over the trained edges (~1, does not cancel): the log-prob's resolution
    "logp_mean": lambda g: _resolutions(g)[0],
    # |weights after - weights before| over the iteration: see PARAM_RTOL
    "param_delta": lambda g: PARAM_RTOL * abs(float(g["param_delta"])),
}
INT_KEYS = ("nfe_rollout", "nfe_update", "edges", "optimizer_steps")
#: recorded for the tolerances only (not compared)
SCALE_KEYS = ("logp_scale", "clip_near")
KEYS = (*TOLERANCE, "clip_frac", *INT_KEYS)
#: from the runner's iterations.jsonl (the rest comes from the probe)
LOGGED = ("reward_mean", "reward_std", "loss", "approx_kl", "grad_norm", "first_ratio", "clip_frac", *INT_KEYS)


def tolerance(key: str, golden: dict[str, Any], got: dict[str, Any] | None = None) -> float:
    """Absolute tolerance of ``key`` for one iteration (0 for integers)."""
    if key in INT_KEYS:
        return 0.0
    if key == "clip_frac":
        return _tol_clip(golden, got or {})
    return TOLERANCE[key](golden)


# ---- the probe ------------------------------------------------------------------------------------------
class _Probe:
    """Sees what the PPO update sees, one iteration at a time: the advantages, old and new log-probs and
    clip range of every trained edge (``algorithms.common.ppo_clip_loss``, which every built-in algorithm's
    update goes through) and the summands' magnitude of the log-probs the update recomputes for them
    (``bench.engine.sde.gaussian_log_prob`` inside ``RolloutEngine.logp``). The wrapped functions compute exactly
    what they did."""

    def __init__(self) -> None:
        self.terms: list[tuple[Any, ...]] = []
        self.scales: list[float] = []
        self._in_logp = False
        self.iterations: list[dict[str, float]] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Probe]:
        import torch

        from algorithms import common
        from bench.engine import sde
        from bench.engine.rollout import RolloutEngine

        ppo_clip_loss, gaussian_log_prob, engine_logp = common.ppo_clip_loss, sde.gaussian_log_prob, RolloutEngine.logp
        cps_log_prob = sde.cps_log_prob

        def logp(engine, *args, **kwargs):
            self._in_logp = True
            try:
                return engine_logp(engine, *args, **kwargs)
            finally:
                self._in_logp = False

        def log_prob(x, mean, std):
            if self._in_logp:
                with torch.no_grad():
                    s = torch.as_tensor(std).double()
                    summands = ((x.detach() - mean.detach()).double() ** 2 / (2 * s**2) + s.log().abs()
                                + math.log(math.sqrt(2 * math.pi)))
                    self.scales.append(float(summands.reshape(summands.shape[0], -1).mean(1).max()))
            return gaussian_log_prob(x, mean, std)

        def cps_lp(x, mean):
            # CPS (sampler.sde=cps): -(x - mean)^2 averaged over dims; its summands are those squares
            if self._in_logp:
                with torch.no_grad():
                    summands = (x.detach() - mean.detach()).double() ** 2
                    self.scales.append(float(summands.reshape(summands.shape[0], -1).mean(1).max()))
            return cps_log_prob(x, mean)

        def clip_loss(logp_new, logp_old, adv, clip_range, adv_clip_max):
            out = ppo_clip_loss(logp_new, logp_old, adv, clip_range, adv_clip_max)
            a = adv.detach().clamp(-adv_clip_max, adv_clip_max)
            self.terms.append((logp_new.detach().double().cpu(), logp_old.detach().double().cpu(),
                               a.double().cpu(), out.loss.detach().double().cpu(), float(clip_range)))
            return out

        common.ppo_clip_loss, sde.gaussian_log_prob, RolloutEngine.logp = clip_loss, log_prob, logp
        sde.cps_log_prob = cps_lp
        try:
            yield self
        finally:
            common.ppo_clip_loss, sde.gaussian_log_prob, RolloutEngine.logp = (ppo_clip_loss, gaussian_log_prob,
                                                                               engine_logp)
            sde.cps_log_prob = cps_log_prob

    def end_iteration(self, _rec: dict[str, Any]) -> None:
        import torch

        scale = max(self.scales) if self.scales else None
        if not self.terms:  # likelihood-free, direct-gradient, or a surrogate other than ppo_clip_loss
            # (GRPO-Guard, Flow-DPPO): the probe's keys are null and the logged keys are compared alone
            self.iterations.append({"adv_abs_mean": None, "logp_mean": None, "surrogate": None,
                                    "logp_scale": scale, "clip_near": None})
            self.scales.clear()
            return
        if scale is None:
            raise RuntimeError("the golden probe saw PPO terms but no recomputed log-prob: "
                               "bench.engine.sde.gaussian_log_prob is no longer what the update calls; "
                               "update _Probe")
        _, old, adv, loss = (torch.cat([t[i] for t in self.terms]) for i in range(4))
        d_lr = 2 * K_LOGP * U * scale  # a log-ratio's resolution
        near = sum(int((((n - o).exp() - 1).abs() - c).abs().le(d_lr).sum()) for n, o, _, _, c in self.terms)
        self.iterations.append({"adv_abs_mean": float(adv.abs().mean()), "logp_mean": float(old.mean()),
                                "surrogate": float((loss + adv).mean()), "logp_scale": scale, "clip_near": near})
        self.terms.clear()
        self.scales.clear()


def _trainable(policy: Any) -> dict[str, Any]:
    return {k: v.detach().double().clone() for k, v in policy.named_trainable_parameters().items()}


def _distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    if sorted(a) != sorted(b):
        raise RuntimeError("checkpointed weights do not match the model's trainable parameters")
    return math.sqrt(sum(float(((b[k].double() - a[k]) ** 2).sum()) for k in a))


def threads() -> int:
    """Intra-op threads for the golden runs: ``TREEBENCH_TEST_THREADS`` (default 1)."""
    raw = os.environ.get(THREADS_ENV, "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer") from None
    if n < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r}: expected a positive integer")
    return n


def run_case(name: str, out_root: Path, sets: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one case for 2 iterations; returns the compared (and scale) keys of each iteration record.
    ``sets`` overrides settings (tests use it to check that changed math is detected)."""
    import torch

    from bench import config
    from bench.model.models import build_policy
    from bench.run import runner
    from bench.rundir import checkpoint
    from bench.spec import RunSpec
    from bench.types import PREFIX as SNAPSHOT_PREFIX

    case = CASES[name]
    base = {"sampler.steps": 4, "run.progress": False, "eval.every": 0, "eval.at_start": False,
            "train.prompts_per_iteration": 2, "train.lr": 1e-4, "train.optimizer_steps": 2,
            # a checkpoint after every iteration: the weights' change per iteration (param_delta)
            "run.checkpoint_every": 1, "run.keep_checkpoints": 3, **case["sets"], **(sets or {})}
    cfg = config.resolve(base, flags={"algo.name": case["algo"], "model.name": case.get("model", "tiny-random"),
                                      "budget": "2it", "seed": 0, "out": str(out_root / name)})
    n = torch.get_num_threads()
    torch.set_num_threads(threads())
    probe = _Probe()
    try:
        spec = RunSpec.from_config(cfg)
        torch.manual_seed(spec.seed)
        start = _trainable(build_policy(spec.model, torch.device("cpu")))
        with probe.installed():
            summary = runner.run(cfg, on_iteration=probe.end_iteration)
    finally:
        torch.set_num_threads(n)
    recs = [json.loads(line) for line in (summary.out_dir / "iterations.jsonl").read_text().splitlines()]
    # the trained weights only: a checkpoint also holds an algorithm's weight snapshots (snapshot/<name>/...)
    weights = [start] + [{k: v for k, v in checkpoint.load(p).policy.items() if not k.startswith(SNAPSHOT_PREFIX)}
                         for p in checkpoint.list_checkpoints(summary.out_dir)]
    if len(weights) != len(recs) + 1 or len(probe.iterations) != len(recs):
        raise RuntimeError(f"{name}: {len(recs)} iterations, {len(weights) - 1} checkpoints, "
                           f"{len(probe.iterations)} probed updates")
    out = []
    for i, r in enumerate(recs):
        rec = {k: r[k] for k in LOGGED}
        rec.update(probe.iterations[i], param_delta=_distance(weights[i], weights[i + 1]))
        out.append(rec)
    return out


def compute_all() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_case(name, Path(tmp)) for name in CASES}


def ratios(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> dict[str, float]:
    """Per key, the largest |got - golden| / tolerance over the iterations (> 1: a mismatch; an integer
    mismatch is inf)."""
    out: dict[str, float] = {}
    for e, g in zip(expected, got):
        for k in KEYS:
            if e[k] is None or g[k] is None:  # not applicable (no importance ratio, no PPO terms)
                out[k] = max(out.get(k, 0.0), 0.0 if e[k] is None and g[k] is None else math.inf)
                continue
            diff = abs(float(g[k]) - float(e[k]))
            tol = tolerance(k, e, g)
            r = (0.0 if diff == 0 else math.inf) if tol == 0 else diff / tol
            out[k] = max(out.get(k, 0.0), r)
    return out


def differences(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[str]:
    """Human-readable mismatches between two lists of iteration records ([] when they agree)."""
    if len(expected) != len(got):
        return [f"{len(got)} iterations, expected {len(expected)}"]
    out = []
    for i, (e, g) in enumerate(zip(expected, got)):
        for k in KEYS:
            a, b = e[k], g[k]
            if a is None or b is None:  # not applicable (likelihood-free: no ratio; no PPO terms): null stays null
                if not (a is None and b is None):
                    out.append(f"iteration {i} {k}: got {b!r}, golden {a!r}")
                continue
            tol = tolerance(k, e, g)
            if not abs(float(b) - float(a)) <= tol:  # NaN fails
                out.append(f"iteration {i} {k}: got {b!r}, golden {a!r} (tolerance {tol:.3g})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--regenerate", action="store_true", help=f"recompute every case and write {GOLDEN.name}")
    g.add_argument("--check", action="store_true", help="recompute and print the differences")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), help="only these cases (--check)")
    p.add_argument("--json", type=Path, help="also write the recomputed records to this file")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.regenerate and a.cases:
        p.error("--regenerate recomputes every case")
    names = a.cases or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        got = {name: run_case(name, Path(tmp)) for name in names}
    if a.json:
        a.json.write_text(json.dumps({"cases": got}, indent=1, sort_keys=True) + "\n")
    if a.regenerate:
        GOLDEN.write_text(json.dumps({"cases": got}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({len(got)} cases)")
        return 0
    golden = json.loads(GOLDEN.read_text())["cases"]
    worst: dict[str, float] = {}
    bad = {}
    for n in names:
        bad[n] = differences(golden[n], got[n]) if n in golden else ["not in the golden file"]
        print(f"{n}: {'ok' if not bad[n] else '; '.join(bad[n])}")
        if n in golden and len(golden[n]) == len(got[n]):
            for k, r in ratios(golden[n], got[n]).items():
                worst[k] = max(worst.get(k, 0.0), r)
    print("largest |got - golden| / tolerance: " + ", ".join(f"{k} {r:.3g}" for k, r in worst.items()))
    return 1 if any(bad.values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
