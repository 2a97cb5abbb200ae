"""Every error sapo-rl raises to its caller, in one leaf module that imports nothing of sapo's
(an exception a module raises and catches itself stays in that module).

A `ConfigError` and its subclasses are problems the user fixes with a setting or a file: the
command line prints them as one line naming the field (or file) and the fix, not a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem, with a message that names the field and the fix."""


class CheckpointError(ConfigError):
    """A checkpoint (or the output directory) that cannot be written or read back; the message
    names the file and what to do."""


class ProcessCountMismatch(CheckpointError):
    """An intact checkpoint of a run with fewer processes: not corrupt, so never skipped."""


class NonFiniteUpdateError(ConfigError):
    """Training stopped because updates went non-finite: too many optimizer steps in a row with
    a NaN or infinite loss, gradient norm or loss input (see max_nonfinite_steps), or parameters
    that became NaN or infinite. No checkpoint holds such parameters. The fix is a setting
    (learning_rate, max_grad_norm, dtype)."""


class LogWriteError(ConfigError):
    """A log line that could not be written (a full disk, say): one line naming the file."""


class SandboxUnavailable(ConfigError):
    """The isolation the code sandbox needs cannot be set up on this machine."""


class RewardError(RuntimeError):
    """A reward function raised on a sample and the run is not set to skip such samples."""


class EngineError(RuntimeError):
    """The rollout engine cannot go on: an inference server that does not answer, answers
    malformed data, or serves another model. The message names the server and what to do."""
