"""Run under a 2-process launch by tests/test_fsdp.py: a weight snapshot swapped into a sharded denoiser
gives the snapshot's outputs, and the trained weights come back after. Writes rank<r>.json into argv[1]
(one file per rank: the ranks share stdout, whose lines can interleave)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bench import config
from bench.model.fsdp import shard_denoiser
from bench.model.models import build_policy
from bench.model.snapshots import WeightSnapshots
from bench.spec import RunSpec


def main() -> None:
    dist.init_process_group("gloo")
    cfg = config.resolve({}, flags={"algo.name": "grpo", "model.name": "tiny-random"})
    pol = build_policy(RunSpec.from_config(cfg).model, torch.device("cpu"))
    shard_denoiser(pol.denoiser)
    pol.pin_trainable_parameters()
    snaps = WeightSnapshots(pol.named_trainable_parameters, lambda: pol.denoiser)
    snaps.add("old")
    x = torch.randn(2, *pol.latent_shape, generator=torch.Generator().manual_seed(0))
    c, t = pol.encode_prompts(["a", "b"]), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        before = pol.predict(x, t, c)
    opt = torch.optim.SGD(pol.trainable_parameters(), lr=0.5)
    pol.predict(x, t, c).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        after = pol.predict(x, t, c)
        with snaps.use("old"):
            old = pol.predict(x, t, c)
        again = pol.predict(x, t, c)
    rank = dist.get_rank()
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "moved": float((after - before).abs().max()),
        "old_vs_before": float((old - before).abs().max()),
        "restored_vs_after": float((again - after).abs().max())}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
