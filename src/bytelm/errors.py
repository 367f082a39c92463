"""One error story: every problem that is the user's input, not a bug, is a `BytelmError`.

The CLI prints a `BytelmError` as one line naming the problem and exits with status 2; anything else is a bug and
keeps its traceback. Some errors are not refusals of bad input but runs that could not finish (a model whose output
turned NaN, a swarm that lost every server of a span, a full disk): they too are one line and status 2, and say what
was kept. Each error also subclasses `ValueError`, as bad values in Python do, so `except ValueError`
still catches them.

    BytelmError
      ConfigError        a config (model, training, fine-tune) that cannot describe a run: bad value, type, field
      DataError          unusable data: a missing path, an empty file, a corpus too short for one window
        NoSamplesError   a sound file that holds no samples
        PromptRowsError  a number of an image's top rows to keep as a prompt that the image or the model cannot give
      CheckpointError    a model folder, run folder or checkpoint that cannot be read or written
        HubError         a hub id that cannot be resolved, or a push that failed
        AdapterError     a LoRA setting, adapter folder or base that cannot be used
      GenerationError    bad generation arguments: prompt, length, sampling settings
        ContextLengthError  a prompt plus the bytes asked for that exceed the model's context (max_seq_len)
      GenerationFailed   a generation that started and could not finish (non-finite logits, a failed swarm)
      TrainingDiverged   a training run whose loss, gradients or weights stopped being finite
      EvaluationError    bad evaluation arguments: window length, stride, batch size
      UsageError         a command-line request that cannot be carried out (a file that is a folder, ...)
      MemoryLimitError   a model, batch, cache or adapter that would not fit in the device's memory (estimated before
                         anything is allocated; BYTELM_MEMORY_LIMIT overrides the check)
      UnknownSession     a swarm server's answer to a step for a session it does not hold (closed or expired)

Callers that answer errors differently (the server's HTTP status, the swarm client's failover) tell them apart by
class, never by their message, which is for people and may change.
"""


class BytelmError(ValueError):
    """A problem with what was asked of bytelm (its input), with a message that names it."""


class ConfigError(BytelmError):
    """A config that cannot describe a model or a run (bad value or type, unknown preset or field)."""


class DataError(BytelmError):
    """Unusable data: a missing path, an empty file or directory, a corpus too short for one window."""


class NoSamplesError(DataError):
    """A sound file that reads, but holds no samples."""


class PromptRowsError(DataError):
    """A number of an image's top rows to keep as a prompt that the image does not have, or that leaves the model
    nothing to make (all of its rows)."""


class CheckpointError(BytelmError):
    """A model folder, run folder or checkpoint that cannot be loaded or written, with the reason."""


class HubError(CheckpointError):
    """A hub id that cannot be resolved, or a push that failed, with the reason."""


class AdapterError(CheckpointError):
    """A LoRA setting, adapter folder or base that cannot be used, with the reason."""


class GenerationError(BytelmError):
    """Bad generation arguments (prompt type, length, sampling settings)."""


class ContextLengthError(GenerationError):
    """A prompt plus the bytes asked for that together exceed the model's context (max_seq_len)."""


class GenerationFailed(BytelmError):
    """A generation that started and could not finish; what was generated so far is not the answer."""


class TrainingDiverged(BytelmError):
    """A training run whose loss, gradient norm or weights are no longer finite; it stops without saving them."""


class EvaluationError(BytelmError):
    """Bad evaluation arguments (window length, stride, batch size, data)."""


class UsageError(BytelmError):
    """A command-line request that cannot be carried out as given."""


class MemoryLimitError(BytelmError):
    """A model, batch, decoding state or adapter that would not fit in the memory the device has left, refused before
    anything is allocated, with the estimate and what is available (bytelm.devices.check_memory)."""


class UnknownSession(BytelmError):
    """A swarm server holds no session of that id for the peer that asked (never opened, closed, or expired while
    idle). The client opens a new one and replays its history there, without counting the server as failed; `code`
    names this error in the server's error reply (bytelm.swarm.wire)."""

    code = "unknown_session"


__all__ = ["AdapterError", "BytelmError", "CheckpointError", "ConfigError", "ContextLengthError", "DataError",
           "EvaluationError", "GenerationError", "GenerationFailed", "HubError", "MemoryLimitError", "NoSamplesError",
           "PromptRowsError", "TrainingDiverged", "UnknownSession", "UsageError"]
