"""DiffusionNFT and the weight snapshots it samples with, on the tiny flow model: closed-form NFE with and
without CFG and the KL term, the update's direction (towards the positive samples), the old-policy EMA,
exact resume with the snapshots checkpointed, and the snapshot mechanism itself. Parity with the
reference code is tests/test_parity_rivals.py; contract, smoke and preset tests pick it up from the registry."""

from __future__ import annotations

import json

import pytest
import torch
from test_algorithms import BATCH, P, brightness, iterate, make

from algorithms.diffusionnft import old_policy_decay
from bench import config
from bench.engine.rollout import RolloutEngine
from bench.model.snapshots import PREFIX, WeightSnapshots
from bench.run import runner
from bench.run.records import TIMING_KEYS
from bench.rundir import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_policy(flow_policy):
    """The shared tiny flow model, its weights restored after the test (updates here take real steps)."""
    saved = {k: v.clone() for k, v in flow_policy.denoiser.state_dict().items()}
    yield flow_policy
    flow_policy.denoiser.load_state_dict(saved)


@pytest.mark.parametrize("guidance,kl_beta", [(1.0, 0.0), (3.0, 0.0), (1.0, 1e-4), (3.0, 1e-4)])
def test_nfe_closed_form(flow_policy, guidance, kl_beta):
    c = 2 if guidance > 1 else 1
    G, T = 3, 5
    algo = make("diffusionnft", {"group_size": G, "kl_beta": kl_beta}, steps=T, guidance=guidance)
    assert algo.plan(0).modes == ("dpm2",) * T
    eng, roll, _, st, trained = iterate(algo, flow_policy)
    n_train = int(T * 0.99)  # 4 of the 5 steps per image
    assert eng.nfe_rollout == roll.nfe == P * G * T * c
    assert not bool(roll.trainable.any()) and trained.numel() == 0  # no log-prob is ever asked for
    # per (image, step): the trained and the old policy (+ the initial weights with the KL), all unguided
    assert eng.nfe_update == st.nfe == P * G * n_train * (3 if kl_beta > 0 else 2)
    assert st.edges == P * G * n_train
    assert st.kl == pytest.approx(0.0, abs=1e-12)  # before the first step: trained = initial weights
    assert st.metrics["diffusionnft/old_deviation"] == pytest.approx(0.0, abs=1e-12)  # and = old
    assert all(v != v for v in (st.approx_kl, st.clip_frac, st.first_ratio))  # NaN: there is no ratio


def test_terms_cover_each_image_with_distinct_steps():
    algo = make("diffusionnft", {"group_size": 2, "timestep_fraction": 0.6}, steps=5)

    class R:  # the fields ``terms`` reads
        num_leaves, iteration = 4, 3
        plan = algo.plan(0)

    leaves, steps = algo.terms(R)
    assert leaves.numel() == steps.numel() == 4 * 3  # int(5 * 0.6) = 3 steps per image
    for j in range(4):
        s = steps[leaves == j]
        assert s.numel() == 3 and len(set(s.tolist())) == 3 and int(s.max()) < 5
    again = algo.terms(R)
    assert torch.equal(again[0], leaves) and torch.equal(again[1], steps)  # pure in the iteration


def test_update_pulls_the_velocity_towards_positive_samples(fresh_policy):
    algo = make("diffusionnft", {"group_size": 4, "kl_beta": 0.0}, steps=4)
    eng = RolloutEngine(fresh_policy, max_micro_batch=64, seed=0)
    eng.snapshots.declare(algo)
    roll = eng.run(algo.plan(0), BATCH, 0)
    adv = algo.advantages(BATCH, roll, brightness(roll))
    leaves, steps = algo.terms(roll)
    x0 = roll.latents[roll.leaves][leaves]
    t = roll.sigmas[steps].reshape(-1, 1, 1, 1)
    xt = (1 - t) * x0 + t * algo.term_noise(roll, torch.arange(leaves.numel()), tuple(x0.shape[1:]))
    prompts = roll.leaf_prompts()[leaves]

    def x0_error():
        with torch.no_grad():
            v = eng.predict(roll, xt, steps, prompts).out
        return ((xt - t * v - x0) ** 2).mean(dim=(1, 2, 3))

    before = x0_error()
    opt = torch.optim.SGD(fresh_policy.trainable_parameters(), lr=0.05)
    algo.update(fresh_policy, eng, opt, roll, adv)
    delta = x0_error() - before
    a = adv.leaf[leaves]
    pos, neg = a > 0.1, a < -0.1
    assert pos.any() and neg.any()
    # the x0 error falls on positive samples relative to negative ones
    assert float(delta[pos].mean()) < float(delta[neg].mean())
    assert float((a * delta).sum()) < 0


def test_old_policy_trails_the_trained_weights_by_the_decay(fresh_policy):
    algo = make("diffusionnft", {"group_size": 2, "kl_beta": 0.0, "decay_type": 1}, steps=3)
    eng = RolloutEngine(fresh_policy, max_micro_batch=64, seed=0)
    eng.snapshots.declare(algo)
    opt = torch.optim.SGD(fresh_policy.trainable_parameters(), lr=0.05)
    old_before = {k: v.clone() for k, v in eng.snapshots.state_dict().items()}
    for i in range(2):
        roll = eng.run(algo.plan(i), BATCH, i)
        algo.update(fresh_policy, eng, opt, roll, algo.advantages(BATCH, roll, brightness(roll)))
        d = old_policy_decay(algo.optimizer_steps_total, 1)
        assert d == pytest.approx(0.001 * (i + 1))
        after = eng.snapshots.state_dict()
        for n, p in fresh_policy.named_trainable_parameters().items():
            key = f"{PREFIX}old/{n}"
            torch.testing.assert_close(after[key], d * old_before[key] + (1 - d) * p.detach())
        old_before = {k: v.clone() for k, v in after.items()}
    assert algo.state_dict()["optimizer_steps_total"] == 2


def test_invalid_settings_name_the_key():
    for over, key in [({"beta": 0.0}, "algo.beta"), ({"decay_type": 3}, "algo.decay_type"),
                      ({"adv_mode": "up"}, "algo.adv_mode"), ({"solver": "euler"}, "algo.solver"),
                      ({"kl_beta": -1.0}, "algo.kl_beta"), ({"group_size": 1}, "algo.group_size")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            make("diffusionnft", over)
    with pytest.raises(ValueError, match="flow"):
        make("diffusionnft", prediction="epsilon")
    with pytest.raises(ValueError, match=r"algo\.ema_decay"):
        make("diffusionnft", {"ema": True, "ema_decay": -0.1})


# ---- through the runner: exact resume with the snapshots in the checkpoint -----------------------------
def _cfg(out, budget, **sets):
    base = {"sampler.steps": 3, "run.progress": False, "eval.every": 0, "eval.at_start": False,
            "train.prompts_per_iteration": 2, "train.lr": 1e-3, "algo.group_size": 2, "algo.kl_beta": 1e-3,
            "run.checkpoint_every": 1, **sets}
    return config.resolve(base, flags={"algo.name": "diffusionnft", "model.name": "tiny-random",
                                       "budget": budget, "out": str(out)})


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "iterations.jsonl").read_text().splitlines()]


def test_resume_restores_the_snapshots_and_continues_identically(tmp_path):
    ref = runner.run(_cfg(tmp_path / "ref", "3it")).out_dir
    part = runner.run(_cfg(tmp_path / "part", "2it")).out_dir
    ck = checkpoint.load_latest(part)
    assert ck.iteration == 2
    olds = {k: v for k, v in ck.policy.items() if k.startswith(f"{PREFIX}old/")}
    inits = {k: v for k, v in ck.policy.items() if k.startswith(f"{PREFIX}initial/")}
    assert olds and inits and len(olds) == len(inits)
    trained = {k: v for k, v in ck.policy.items() if not k.startswith(PREFIX)}
    # the old policy lags the trained weights; the initial weights are not the trained ones
    assert any(not torch.equal(olds[f"{PREFIX}old/{n}"], w) for n, w in trained.items())
    runner.run(_cfg(part, "3it"), resume=True)
    assert _records(ref) == _records(part)


def test_a_checkpoint_without_the_snapshots_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from bench.errors import UsageError

    part = runner.run(_cfg(tmp_path / "part", "1it", **{"run.keep_checkpoints": 1})).out_dir
    ck_dir = checkpoint.list_checkpoints(part)[0]
    tensors = load_file(str(ck_dir / "policy.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith(f"{PREFIX}old/")}, str(ck_dir / "policy.safetensors"))
    meta = json.loads((ck_dir / "meta.json").read_text())
    meta["files"]["policy.safetensors"] = {"bytes": (ck_dir / "policy.safetensors").stat().st_size,
                                           "sha256": checkpoint._sha256(ck_dir / "policy.safetensors")}
    (ck_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="no weight snapshot 'old'"):
        runner.run(_cfg(part, "2it"), resume=True)


# ---- the snapshot mechanism -------------------------------------------------------------------------
def test_snapshots_swap_restore_blend_and_round_trip():
    lin = torch.nn.Linear(2, 1)
    snaps = WeightSnapshots(lambda: dict(lin.named_parameters()))
    snaps.add("old")
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    x = torch.ones(1, 2)
    with torch.no_grad(), snaps.use("old"):
        torch.testing.assert_close(lin.weight, w0)  # the snapshot's values inside the block
        out_old = lin(x)
    torch.testing.assert_close(lin.weight.detach(), w0 + 1.0)  # the trained values after it
    assert not torch.equal(out_old, lin(x))
    with pytest.raises(RuntimeError, match="without gradients"), snaps.use("old"):
        pass
    snaps.blend("old", 0.25)
    torch.testing.assert_close(snaps.state_dict()[f"{PREFIX}old/weight"], 0.25 * w0 + 0.75 * (w0 + 1.0))
    other = WeightSnapshots(lambda: dict(lin.named_parameters()))
    other.add("old")
    other.load_state_dict(snaps.state_dict())
    torch.testing.assert_close(other.state_dict()[f"{PREFIX}old/weight"], snaps.state_dict()[f"{PREFIX}old/weight"])
    with pytest.raises(KeyError, match="no weight snapshot 'ema'"), torch.no_grad(), snaps.use("ema"):
        pass
    for bad in ("current", "reference", "Old", ""):
        with pytest.raises(ValueError, match="lower-case identifier"):
            snaps.add(bad)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        snaps.blend("old", 1.5)
