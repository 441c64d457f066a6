"""Build bench/profiles/sd3.5-medium-h200.json from the bare measurement file of the SD3.5-medium
transformer on one H200 (kinds forward, forward_backward, forward_backward_checkpointed; rows 1..64 /
1..16). Usage: python scripts/make_h200_profile.py MEASUREMENTS.json bench/profiles/sd3.5-medium-h200.json

The measurement has no VAE, text-encoder, reward, LoRA-backward or optimizer numbers; ASSUMPTIONS says
what the cost model does for each, so no guess is ever stored as a measurement.
"""

import json
import sys

from bench.cost.profiling import convert_measurements

ASSUMPTIONS = {
    "forward_backward": "Measured with FULL fine-tuning (every transformer parameter trainable). LoRA runs (the "
                        "sd3.5-medium preset: rank 32) are priced with these numbers; LoRA backward was not "
                        "measured. LoRA skips the weight-gradient products of the frozen base weights, so the "
                        "full-fine-tuning time is expected to be an upper bound for LoRA (not verified).",
    "forward_backward_checkpointed": "As forward_backward, with the transformer's gradient checkpointing: full "
                                     "fine-tuning measured, LoRA priced with it (not measured).",
    "forward (reference pass)": "The KL term's frozen-reference pass (LoRA adapters disabled) is priced as a "
                                "no-grad forward of the same rows.",
    "vae_decode": "Not measured: estimated from its FLOPs (counted on the meta device from the VAE's module "
                  "definition, bench.engine.flops) at the FLOP/s of the measured forward (its best row count); "
                  "marked estimated. A per-image cost, so leaving it out would favour methods with more images "
                  "per iteration (TreeGRPO).",
    "text_encode": "Not measured (CLIP-L, CLIP-G, T5-XXL): estimated from its FLOPs like vae_decode, once per "
                   "iteration per prompt batch.",
    "reward": "Not measured (HPSv2.1 and friends): estimated from its FLOPs like vae_decode (a reward plug-in's "
              "meta_model()); per image. Rewards without a meta model stay unpriced (0 s) and are listed.",
    "optimizer_step": "Not measured: estimated as max(its FLOPs at the forward's FLOP/s, the bytes AdamW reads and "
                      "writes / the device's memory bandwidth); one or a few per iteration.",
    "rows": "Rows are denoiser input rows per call; a classifier-free-guided evaluation of one latent is 2 rows.",
}

#: what was on the device besides a call's activations when its peak was measured (the memory model of
#: docs/COST.md subtracts it): the 2,243,171,520 bf16 transformer weights; for the checkpointed backward also
#: their bf16 gradients (its peak is reached inside the backward, while the gradients are written)
WEIGHTS_MIB = 2_243_171_520 * 2 / 2**20
MEMORY = {
    "resident_mb": {"forward": WEIGHTS_MIB, "forward_backward": WEIGHTS_MIB,
                    "forward_backward_checkpointed": 2 * WEIGHTS_MIB},
    "note": "Resident when peak_mem_mb (torch.cuda.max_memory_allocated) was measured, besides the call's own "
            "activations: the transformer's 2,243,171,520 bf16 weights (4278.5 MiB), nothing else (no text "
            "encoders, VAE or optimizer state). forward_backward_checkpointed adds the bf16 gradients (4278.5 "
            "MiB): with checkpointing the peak is reached inside the backward while the gradients are written "
            "(1 row: 9108 MiB = weights + gradients + 551 MiB, as forward_backward's 1-row peak). Without "
            "checkpointing the peak is reached at the end of the forward, before any gradient exists (2-16 "
            "rows: +3.3 GiB per row), except at 1 row, where the gradient phase is the larger.",
}


def main(src: str, out: str) -> None:
    with open(src) as f:
        obj = json.load(f)
    prof = convert_measurements(
        obj, name="sd3.5-medium-h200", model="sd3.5-medium", models=["sd3.5-medium", "sd3.5-medium-random"],
        trainable="full fine-tuning (all 2.24 B transformer parameters)", assumptions=ASSUMPTIONS,
        source=f"converted from a measurement of {obj.get('model', '')} on {obj.get('device', '')}; "
               f"not measured: {obj.get('not_measured', '')}")
    prof["memory"] = MEMORY
    with open(out, "w") as f:
        json.dump(prof, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
