"""Every error type of treebench, one class each, recognised by class (never by name or message).

Usage errors (exit status 2, message only): ``UsageError`` and its subclasses. Run faults with a clear
cause (exit status 1, message only): ``RunFailure`` and its subclasses. The rest is control flow inside
the runner. Plug-ins may import this module: a reward whose weights are absent raises
``MissingWeightsError``; an algorithm refusing its settings raises ``ValueError`` and the runner turns it
into ``AlgorithmSettingsError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UsageError(ValueError):
    """A user mistake (unknown name, bad value, contradictory options): the CLI prints the message
    and exits with status 2."""


class RunLocked(UsageError):
    """Another live process writes this run directory (``bench.rundir.lock``); the message names it."""


class MissingWeightsError(UsageError):
    """Model or reward weights are not on this machine; the message names every path looked at and
    how to obtain the files."""


class AlgorithmSettingsError(UsageError):
    """An algorithm refused its settings (e.g. TreeGRPO's d > window): a property of the sampled
    combination, not of the machine, so a sweep prunes the trial instead of stopping."""


@contextlib.contextmanager
def algorithm_settings(name: str, catch: tuple[type[Exception], ...] = (ValueError,)) -> Iterator[None]:
    """The one place an algorithm's refusal of its settings (``catch``: ValueError from its constructor;
    TypeError too where its Config is built from user keys) becomes ``AlgorithmSettingsError``:
    ``with algorithm_settings(name): algo = cls(...)``."""
    try:
        yield
    except UsageError:  # already a usage error (e.g. from building the Config): not wrapped twice
        raise
    except catch as e:
        raise AlgorithmSettingsError(f"invalid settings for algorithm {name!r}: {e}") from None


class RunFailure(RuntimeError):
    """A run stopped by a fault with a clear cause (the CLI prints the message, exits 1, no traceback)."""


class WriteFault(RunFailure):
    """Writing the run directory failed (disk full, I/O error, permission denied); the message says
    what failed, what was kept and how to continue (``bench.run.faults.write_failure``)."""


class RewardError(RunFailure):
    """The reward model raised; the message names the file holding the batch's prompts."""


class OutOfMemory(RunFailure):
    """The device ran out of memory; the message says which settings lower memory."""


class CheckpointError(Exception):
    """A checkpoint directory is incomplete or corrupt."""


class StopRun(Exception):
    """Raised by an ``on_iteration`` / ``on_eval`` callback to stop the run early (e.g. a pruned sweep
    trial); ``reason`` becomes the stop reason."""

    def __init__(self, reason: str = "stopped"):
        super().__init__(reason)
        self.reason = reason


class NonFiniteGrad(Exception):
    """Raised before an optimizer step whose gradients hold NaN/inf, so the step is never applied.
    ``nfe``: denoiser forward passes the refused update had spent (set by the update on the way out)."""

    def __init__(self, message: str = "non-finite gradient", nfe: int = 0):
        super().__init__(message)
        self.nfe = nfe


class Interrupted(Exception):
    """SIGINT/SIGTERM seen at a phase boundary before the update: the state is still consistent."""


def is_out_of_memory(e: BaseException) -> bool:
    """Device or host memory exhausted, by class: torch raises ``torch.OutOfMemoryError`` (CUDA, and
    its alias ``torch.cuda.OutOfMemoryError``), Python ``MemoryError``; the runner's own ``OutOfMemory``."""
    import torch

    return isinstance(e, (OutOfMemory, MemoryError, torch.OutOfMemoryError))
