"""FLOP counts on the meta device against closed forms, the per-kind counts of the tiny models, the device
table, estimated pricing, and FLOPs / MFU in the run records."""

import json
import math

import pytest
import torch
from torch import nn

from bench import config
from bench.engine import flops
from bench.engine import pricing as cost
from bench.engine.trace import Call
from bench.errors import UsageError


def _linear_stack(trainable_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    m[0].requires_grad_(trainable_first)
    return m


def test_linear_stack_forward_and_backward_closed_forms():
    """y = W2 relu(W1 x): forward 2 (8*16 + 16*4) = 384 FLOPs per row. Backward with both layers trainable:
    weight gradients of both (384) + the input gradient of layer 2 (2*16*4 = 128; the input x needs none).
    With only layer 2 trainable (LoRA-like): its weight gradient only (2*16*4 = 128)."""
    m = _linear_stack()
    x = torch.zeros(5, 8, device="meta")
    f, _ = flops.measure(lambda: m(x), memory=False)
    assert f == 5 * 384
    f, _ = flops.measure(lambda: m(x).sum().backward(), memory=False)
    assert f == 5 * (384 + 384 + 128)
    m2 = _linear_stack(trainable_first=False)
    f, _ = flops.measure(lambda: m2(x).sum().backward(), memory=False)
    assert f == 5 * (384 + 128)


def test_attention_runs_as_the_gpu_kernel_closed_form():
    """Attention of L = 10 tokens, H = 2 heads of d = 4, batch 3: forward QK^T and AV = 4 B H L^2 d; the
    memory-efficient kernel's backward recomputes QK^T and forms dV, dP, dQ, dK: 10 B H L^2 d."""
    B, H, L, d = 3, 2, 10, 4
    q, k, v = (torch.zeros(B, H, L, d, device="meta", requires_grad=True) for _ in range(3))
    fwd = 4 * B * H * L * L * d
    f, _ = flops.measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), memory=False)
    assert f == fwd
    f, _ = flops.measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward(),
                         memory=False)
    assert f == fwd + 10 * B * H * L * L * d


def test_attention_block_closed_form():
    """Projections to q, k, v and out (4 D x D matmuls) plus attention, D = 8 = 2 heads x 4, L = 6 tokens:
    per sequence 4 * 2 L D^2 + 4 L^2 D."""
    D, L, heads = 8, 6, 2

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

        def forward(self, x):
            def split(t):
                return t.view(x.shape[0], L, heads, D // heads).transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
            return self.o(a.transpose(1, 2).reshape(x.shape[0], L, D))

    with torch.device("meta"):
        blk = Block()
    f, _ = flops.measure(lambda: blk(torch.zeros(2, L, D, device="meta")), memory=False)
    assert f == 2 * (4 * 2 * L * D * D + 4 * L * L * D)


def test_live_bytes_counts_what_is_alive_at_once():
    """Three float32 tensors of 1000 elements: a, b = a * 2 (a alive), then a freed, c = b + 1: peak 2 x 4000."""
    def fn():
        a = torch.ones(1000, device="meta")
        b = a * 2
        del a
        c = b + 1
        return c

    _, peak = flops.measure(fn)
    assert peak == 2 * 4000


def test_tiny_model_counts_are_linear_in_rows_and_lora_trains_less(tiny_flow_policy):
    meta = flops.meta_policy(tiny_flow_policy)
    one = flops.count_kind(meta, "forward", (1,))
    three = flops.count_kind(meta, "forward", (3,))
    assert one.flops_per_row > 0 and three.flops_per_row == pytest.approx(one.flops_per_row, rel=1e-12)
    fb = flops.count_kind(meta, "forward_backward", (1,))
    ck = flops.count_kind(meta, "forward_backward_checkpointed", (1,))
    # full fine-tuning: the backward computes input and weight gradients of every matmul (about 2x the forward);
    # checkpointing recomputes the forward once more
    assert 2.5 * one.flops_per_row < fb.flops_per_row <= 3.5 * one.flops_per_row
    assert ck.flops_per_row == pytest.approx(fb.flops_per_row + one.flops_per_row, rel=0.02)
    te = flops.count_kind(meta, "text_encode", (1, 2), memory=True)
    assert te.flops_per_row > 0 and te.act_mib[1] > te.act_mib[0] > 0


def test_count_model_of_a_run_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEBENCH_CACHE", str(tmp_path))
    from bench.model.models import build_policy
    from bench.spec import RunSpec

    cfg = config.resolve({"model.lora_rank": 2, "model.lora_alpha": 2}, flags={"algo.name": "grpo",
                                                                             "model.name": "sd3.5-medium-random-reduced"})
    pol = build_policy(RunSpec.from_config(cfg).model, torch.device("cpu"))
    rewards = flops.meta_rewards("brightness", {})
    c = flops.count_model(pol, rewards)
    trainable = sum(p.numel() for p in pol.denoiser.parameters() if p.requires_grad)
    assert c.parameters["trainable"] == trainable
    assert c.kinds["optimizer_step"].flops_per_row == flops.OPTIMIZER_FLOPS_PER_PARAMETER * trainable
    assert c.kinds["reward:brightness"].flops_per_row == 0.0  # a mean over pixels: no matrix products
    assert c.kinds["vae_decode"].flops_per_row > 0
    # the real module was not touched: still on the CPU, weights intact
    assert next(pol.denoiser.parameters()).device.type == "cpu"
    assert c.call_flops(Call("forward", 6, "rollout", per_eval=2)) == 6 * c.kinds["forward"].flops_per_row
    assert c.call_flops(Call("optimizer_step", 1, "update", "optimizer")) == c.kinds["optimizer_step"].flops_per_row
    assert c.call_flops(Call("reward", 3, "reward", "nope")) is None
    # cached: the same counts come back without counting
    assert flops.load_cached(c.key) == c


def test_device_table():
    assert flops.device_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4e12
    assert flops.device_peak("NVIDIA H100 PCIe", "bf16")[0] == 756.0e12
    assert flops.device_peak("NVIDIA H200", "no")[0] == 66.9e12
    assert flops.device_peak("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0e12
    peak, why = flops.device_peak("Some Accelerator", "bf16")
    assert peak is None and "run.peak_flops" in why
    assert flops.run_peak(5e12, "no", "cpu") == (5e12, "run.peak_flops")
    assert flops.run_peak(None, "no", "cpu")[0] is None
    with pytest.raises(UsageError, match="run.peak_flops"):
        config.resolve({"run.peak_flops": -1})


def test_estimated_pricing_at_the_measured_forward_rate(tmp_path):
    """A profile measuring only the forward (2 rows: 0.5 s, 8 rows: 1.0 s); a model of 1e9 FLOPs per forward
    row: rates 4e9 and 8e9 FLOP/s, the best 8e9 prices the unmeasured kinds; the optimizer step is
    bandwidth-bound on a known device."""
    prof = cost.CostProfile.from_json({"format": cost.FORMAT, "name": "t", "device": "NVIDIA H100", "kinds": {
        "forward": {"points": [{"rows": 2, "seconds": 0.5}, {"rows": 8, "seconds": 1.0}]}}})
    counts = flops.ModelCounts({"forward": flops.KindCount(1e9), "vae_decode": flops.KindCount(4e9),
                                "optimizer_step": flops.KindCount(17e6)},
                               {"trainable": 1_000_000}, {}, (4, 8, 8))
    calls = [Call("forward", 8, "rollout", per_eval=2), Call("vae_decode", 3, "rollout", "vae"),
             Call("reward", 3, "reward", "hpsv2"), Call("optimizer_step", 1, "update", "optimizer")]
    p = cost.price(prof, calls, counts)
    opt_s = max(17e6 / 8e9, flops.OPTIMIZER_BYTES_PER_PARAMETER * 1e6 / 3.35e12)
    assert p.kind_seconds["vae_decode"] == pytest.approx(12e9 / 8e9)
    assert p.kind_seconds["optimizer_step"] == pytest.approx(opt_s)
    assert p.phases["rollout"] == pytest.approx(1.0 + 1.5)
    assert p.estimated == {"optimizer_step": 1, "vae_decode": 1} and p.unpriced == {"reward:hpsv2": 1}
    assert p.kind_flops == {"forward": 8e9, "vae_decode": 12e9, "optimizer_step": 17e6}
    # without counts the same calls are unpriced, as before
    assert cost.price(prof, calls).unpriced == {"optimizer_step": 1, "reward:hpsv2": 1, "vae_decode": 1}


def _run(tmp_path, name, **sets):
    from bench.run import runner

    base = {"eval.every": 0, "eval.at_start": False, "sampler.steps": 3, "train.micro_batch": 6,
            "run.progress": False, "run.checkpoint_every": 0, "run.trace": True, "algo.k": 2, "algo.d": 2}
    base.update(sets)
    cfg = config.resolve(base, flags={"algo.name": "treegrpo", "model.name": "tiny-random", "budget": "2it",
                                      "out": str(tmp_path / name)})
    return runner.run(cfg)


def test_records_carry_flops_and_mfu(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEBENCH_CACHE", str(tmp_path / "cache"))
    from bench.engine.trace import TRAIN_PHASES, read_trace

    s = _run(tmp_path, "a", **{"run.peak_flops": 1e9})
    man = json.loads((s.out_dir / "manifest.json").read_text())
    per_row = man["flops"]["flops_per_row"]
    assert man["flops"]["counted"] and man["flops"]["peak_source"] == "run.peak_flops"
    recs = [json.loads(x) for x in (s.out_dir / "iterations.jsonl").read_text().splitlines()]
    trace = [t for t in read_trace(s.out_dir) if t["stage"] == "train"]
    total = 0.0
    for rec, t in zip(recs, trace):
        expect = sum(per_row[f"reward:{c.component}" if c.kind == "reward" else c.kind]
                     * (1 if c.kind == "optimizer_step" else c.rows) for c in t["calls"] if c.phase in TRAIN_PHASES)
        total += expect
        assert rec["flops"] == pytest.approx(expect, rel=1e-12) and rec["flops_total"] == pytest.approx(total)
        assert rec["mfu"] == pytest.approx(expect / (rec["t_iteration_s"] * 1e9))
        assert rec["flops_uncounted_calls"] == 0
    final = json.loads((s.out_dir / "final.json").read_text())
    assert final["flops_total"] == pytest.approx(total)
    from bench.show import summarize

    assert summarize(s.out_dir)["flops"] == pytest.approx(total)


def test_cpu_run_without_a_peak_has_flops_but_no_mfu(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEBENCH_CACHE", str(tmp_path / "cache"))
    s = _run(tmp_path, "b")
    rec = json.loads((s.out_dir / "iterations.jsonl").read_text().splitlines()[0])
    assert rec["flops"] > 0 and rec["mfu"] is None
    man = json.loads((s.out_dir / "manifest.json").read_text())
    assert man["flops"]["peak_flops_per_device"] is None and "run.peak_flops" in man["flops"]["peak_source"]
    s2 = _run(tmp_path, "c", **{"run.flops": False})
    rec = json.loads((s2.out_dir / "iterations.jsonl").read_text().splitlines()[0])
    assert rec["flops"] is None and rec["mfu"] is None
    assert math.isfinite(rec["loss"])


@pytest.mark.slow
def test_shipped_counts_equal_a_fresh_count(tmp_path, monkeypatch):
    """bench/profiles/counts/ (the sd3.5-medium paper presets' counts) against a count made now (a minute
    or more of CPU: the full SD3.5-medium + T5-XXL + HPSv2 architectures on the meta device)."""
    monkeypatch.setenv("TREEBENCH_CACHE", str(tmp_path))
    from bench.cost.estimate import model_counts

    cfg = config.resolve({}, preset="treegrpo-paper", flags={"algo.name": "treegrpo", "model.name": "sd3.5-medium"})
    fresh, _, _ = model_counts(cfg, use_cache=False)
    shipped = json.loads((flops.SHIPPED_COUNTS / f"{fresh.key}.json").read_text())
    assert shipped["parameters"] == dict(fresh.parameters)
    for k, v in shipped["kinds"].items():
        assert v["flops_per_row"] == pytest.approx(fresh.kinds[k].flops_per_row, rel=1e-12), k
