"""memkit's own error types.

Every refusal memkit makes at a public entry point is one of these, so callers can
catch ``MemkitError`` and know the input (not memkit) was at fault.
"""


class MemkitError(Exception):
    """Base class of every error memkit raises on purpose."""


class ShapeError(MemkitError, ValueError):
    """A tensor has the wrong rank, size, dtype, device or batch size.

    The message names the offending argument, the dimension and the expected size.
    """


class BackendUnavailableError(MemkitError, RuntimeError):
    """An attention backend was asked for explicitly but cannot run here."""


class StateError(MemkitError, ValueError):
    """A memory state does not belong to the memory it was handed to."""


class DataError(MemkitError, ValueError):
    """A data file or data-set argument cannot be used: missing, unreadable, wrong shape or values.

    The message names the file (when there is one), what was expected and what was found.
    """


class CheckpointError(MemkitError, ValueError):
    """A saved state or checkpoint cannot be loaded as asked: the message says what differs."""


class AttachError(MemkitError, RuntimeError):
    """Memory cannot be attached to (or used with) a host model as asked.

    Raised by :func:`memkit.attach` and :class:`memkit.MemorySession`: no layer matched, a
    layer has no memory, the session is detached, no segment layout was set.
    """


class NonFiniteError(MemkitError, ValueError):
    """A segment about to be written holds NaN or Inf: it would poison the memory for good.

    memkit's policy: a :class:`memkit.Chunk` refuses non-finite keys, values or hidden
    states when it is built (outside ``torch.compile``), so nothing non-finite is ever
    written. Reads are not checked: they cannot change a memory. The check waits for the
    device (a sync per write), so it runs while checking is on
    (:func:`memkit.typing.set_typecheck`, on by default).
    """


class ConfigError(MemkitError, ValueError):
    """A configuration value that cannot work (the message names the field)."""


class UnknownMemoryError(MemkitError, ValueError):
    """A memory name that no factory answers to (or whose class cannot be imported)."""


class UntrustedCodeError(UnknownMemoryError):
    """A config names code to import (``"module:Class"``) and the caller did not trust it.

    Raised before anything is imported: a checkpoint's ``config.json`` must not be able to
    run code. Pass ``trust_remote_code=True`` (CLI: ``--trust-remote-code``) only for files
    whose origin you trust, or register the class with :func:`memkit.memories.register_memory`.
    """


class CLIError(MemkitError):
    """A refusal the ``memkit`` command reports in one line (bad arguments, missing files)."""
