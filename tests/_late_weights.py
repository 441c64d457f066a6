"""A reward whose weights are looked for only when it first scores, as the model-based rewards do: its
``_locate`` (the shared preflight check) must report the missing file before anything is created."""

from bench.errors import MissingWeightsError
from bench.types import RewardOutput


class LateWeights:
    name = "late_weights"
    version = "0"

    def __init__(self, device="cpu", **options):
        self.device = device

    def _locate(self):
        raise MissingWeightsError("late_weights: weights file late.safetensors not found (looked in "
                                  "$TREEBENCH_WEIGHTS/late_weights/)")

    def __call__(self, images, prompts, metadata):  # pragma: no cover - never reached: refused at start-up
        self._locate()
        return RewardOutput(images.mean(dim=(1, 2, 3)), {})
