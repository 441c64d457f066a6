"""LoRA (peft), the frozen reference, mixed precision, gradient checkpointing, LoRA export."""

from __future__ import annotations

import json

import pytest
import torch

from bench import config
from bench.cli import main as cli_main
from bench.engine.rollout import RolloutEngine
from bench.errors import UsageError
from bench.model.models import load_policy
from bench.model.policy import ModelOptions
from bench.model.random_models import tiny_pipeline_dir
from bench.registry import algorithm_class
from bench.run import runner
from bench.types import PromptBatch, RewardOutput, SamplerSpec, TrainSpec

PROMPTS = PromptBatch(("a red circle", "a blue square"))


def _grpo_iteration(pol, lr=5e-2, beta=0.0):
    cls = algorithm_class("grpo")
    algo = cls(cls.Config(group_size=3, beta=beta), SamplerSpec(steps=3, guidance=1.0, noise_level=0.7),
               TrainSpec(micro_batch=64), 0)
    eng = RolloutEngine(pol, seed=0)
    roll = eng.run(algo.plan(0), PROMPTS, 0)
    scores = roll.images.mean(dim=(1, 2, 3))
    adv = algo.advantages(PROMPTS, roll, RewardOutput(scores))
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=lr)
    pol.train(True)
    stats = algo.update(pol, eng, opt, roll, adv)
    pol.train(False)
    return roll, stats


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_lora_wraps_trains_and_keeps_base_frozen():
    pol = load_policy(tiny_pipeline_dir("flow"), options=ModelOptions(lora_rank=4, lora_alpha=8))
    assert pol.is_lora
    names = [n for n, p in pol.denoiser.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(not p.requires_grad for m in pol.frozen_modules() for p in m.parameters())
    before = _snapshot(pol.denoiser)
    x = torch.randn(2, *pol.latent_shape)
    t = pol.timestep_values(torch.tensor([0.6, 0.4]))
    cond = pol.encode_prompts(PROMPTS.prompts)
    with torch.no_grad():
        out0 = pol.predict(x, t, cond)
        with pol.reference():
            ref0 = pol.predict(x, t, cond)
    torch.testing.assert_close(out0, ref0)  # lora_B starts at zero: the adapter is the identity
    _, stats = _grpo_iteration(pol)
    assert stats.optimizer_steps == 1 and stats.edges > 0
    after = _snapshot(pol.denoiser)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)  # adapters moved, base weights did not
    with torch.no_grad():
        out1 = pol.predict(x, t, cond)
        with pol.reference():
            ref1 = pol.predict(x, t, cond)
    torch.testing.assert_close(ref1, ref0)  # the reference is the base model
    assert not torch.allclose(out1, ref1)   # the policy has moved away from it
    base = load_policy(tiny_pipeline_dir("flow"))
    with torch.no_grad():
        torch.testing.assert_close(base.predict(x, t, cond), ref1, atol=1e-6, rtol=1e-5)


def test_kl_term_uses_reference_with_lora():
    pol = load_policy(tiny_pipeline_dir("flow"), options=ModelOptions(lora_rank=2))
    _grpo_iteration(pol, lr=5e-2)
    _, stats = _grpo_iteration(pol, lr=1e-3, beta=0.1)
    assert stats.kl > 0  # the adapter moved the mean away from the reference's


def test_full_finetuning_has_no_reference():
    pol = load_policy(tiny_pipeline_dir("flow"))
    assert not pol.is_lora and all(p.requires_grad for p in pol.denoiser.parameters())
    with pytest.raises(NotImplementedError, match="lora_rank"), pol.reference():
        pass


def test_unknown_lora_targets_fail_with_names():
    with pytest.raises(UsageError, match="match no module"):
        load_policy(tiny_pipeline_dir("flow"), options=ModelOptions(lora_rank=2, lora_targets=("nope",)))


@pytest.mark.parametrize("lora", [0, 4])
def test_bf16_autocast_path_runs_with_fp32_step_math(lora):
    pol = load_policy(tiny_pipeline_dir("flow"), autocast_dtype=torch.bfloat16,
                      options=ModelOptions(lora_rank=lora, frozen_dtype=torch.bfloat16))
    assert pol.text_encoder.dtype == torch.bfloat16
    base_dtype = {p.dtype for n, p in pol.denoiser.named_parameters() if "lora_" not in n}
    assert base_dtype == ({torch.bfloat16} if lora else {torch.float32})  # full fine-tuning keeps fp32 masters
    assert all(p.dtype == torch.float32 for p in pol.trainable_parameters())
    roll, stats = _grpo_iteration(pol, lr=1e-3)
    assert roll.logp_old.dtype == torch.float32 and roll.latents.dtype == torch.float32
    assert torch.isfinite(roll.logp_old[roll.trainable]).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in (stats.loss, stats.grad_norm, stats.first_ratio))
    assert abs(stats.first_ratio - 1.0) < 1e-2  # rollout and update see the same bf16 computation


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        pol = load_policy(tiny_pipeline_dir("flow"), options=ModelOptions(gradient_checkpointing=ckpt))
        pol.train(True)
        x = torch.randn(2, *pol.latent_shape, generator=torch.Generator().manual_seed(1))
        out = pol.predict(x, pol.timestep_values(torch.tensor([0.5, 0.2])), pol.encode_prompts(PROMPTS.prompts))
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in pol.trainable_parameters()]))
        if ckpt:
            assert pol.denoiser.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_run_with_lora_bf16_then_export(tmp_path):
    """bench run with model.lora_rank / mixed precision, then `bench export-lora` (diffusers format)."""
    out = tmp_path / "run"
    cfg = config.resolve({"model.lora_rank": 4, "model.lora_alpha": 8, "model.mixed_precision": "bf16",
                          "train.lr": 1e-2, "eval.num_prompts": 1, "run.checkpoint_every": 1, "algo.group_size": 2,
                          "sampler.steps": 3},
                         flags={"algo.name": "grpo", "model.name": "tiny-random", "budget": "1it", "out": str(out),
                                "run.progress": False})
    s = runner.run(cfg)
    assert s.iterations == 1
    rec = json.loads((out / "iterations.jsonl").read_text().splitlines()[0])
    assert rec["edges"] > 0 and rec["grad_norm"] > 0
    exp = tmp_path / "export"
    assert cli_main(["export-lora", str(out), "--out", str(exp), "--merge"]) == 0
    assert (exp / "pytorch_lora_weights.safetensors").is_file()
    assert (exp / "merged" / "transformer" / "config.json").is_file()
    from bench.lora import load_trained_policy

    trained = load_trained_policy(out)
    base = load_policy(tiny_pipeline_dir("flow"))
    base.denoiser.load_lora_adapter(exp, prefix="transformer", weight_name="pytorch_lora_weights.safetensors")
    merged = load_policy(tiny_pipeline_dir("flow"))
    merged.denoiser = type(merged.denoiser).from_pretrained(exp / "merged" / "transformer")
    x = torch.randn(2, *base.latent_shape)
    t = base.timestep_values(torch.tensor([0.5, 0.2]))
    cond = base.encode_prompts(PROMPTS.prompts)
    with torch.no_grad():
        want = trained.predict(x, t, cond)
        with trained.reference():
            assert not torch.allclose(trained.predict(x, t, cond), want)  # training moved the adapter
    from peft.utils import get_peft_model_state_dict

    # the exported adapter holds exactly the trained adapter weights (and its rank/alpha: same outputs)
    got = get_peft_model_state_dict(base.denoiser, adapter_name=next(iter(base.denoiser.peft_config)))
    exp_sd = get_peft_model_state_dict(trained.denoiser)
    assert got.keys() == exp_sd.keys()
    for k in got:
        torch.testing.assert_close(got[k], exp_sd[k].float())
    with torch.no_grad():
        lora_out = base.predict(x, t, cond)
        torch.testing.assert_close(merged.predict(x, t, cond), lora_out, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(lora_out, want, atol=1e-5, rtol=1e-4)


def test_compile_option_keeps_parameter_names():
    """model.compile compiles in place (nn.Module.compile): checkpoint keys do not change."""
    plain = load_policy(tiny_pipeline_dir("flow"))
    comp = load_policy(tiny_pipeline_dir("flow"), options=ModelOptions(compile=True))
    assert [n for n, _ in comp.denoiser.named_parameters()] == [n for n, _ in plain.denoiser.named_parameters()]
    assert getattr(comp.denoiser, "_compiled_call_impl", None) is not None
