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
    "vae_decode": "Not measured: unpriced (0 s). Every modeled total excludes VAE decoding; plans and run "
                  "records count the unpriced calls. A per-image cost, so it favours methods with more images "
                  "per iteration (TreeGRPO).",
    "text_encode": "Not measured (CLIP-L, CLIP-G, T5-XXL): unpriced (0 s), once per iteration per prompt batch.",
    "reward": "Not measured (HPSv2.1 and friends): unpriced (0 s); per image, like vae_decode.",
    "optimizer_step": "Not measured: unpriced (0 s); one or a few per iteration.",
    "rows": "Rows are denoiser input rows per call; a classifier-free-guided evaluation of one latent is 2 rows.",
}


def main(src: str, out: str) -> None:
    with open(src) as f:
        obj = json.load(f)
    prof = convert_measurements(
        obj, name="sd3.5-medium-h200", model="sd3.5-medium", models=["sd3.5-medium", "sd3.5-medium-random"],
        trainable="full fine-tuning (all 2.24 B transformer parameters)", assumptions=ASSUMPTIONS,
        source=f"converted from a measurement of {obj.get('model', '')} on {obj.get('device', '')}; "
               f"not measured: {obj.get('not_measured', '')}")
    with open(out, "w") as f:
        json.dump(prof, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
