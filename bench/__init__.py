"""treebench core: records, step math, rollout engine, runner, CLI."""

from bench import _torchvision_fix

_torchvision_fix.install()

__version__ = "0.1.0"
