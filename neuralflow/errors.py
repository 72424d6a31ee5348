"""Errors raised by neuralflow.

Every error is a :class:`NeuralflowError`; its message says what went wrong and what to do.
"""

from __future__ import annotations


class NeuralflowError(Exception):
    """Base class of every error neuralflow raises on purpose."""


class InputError(NeuralflowError, ValueError):
    """An argument has the wrong value, shape, dtype or type."""


class DivergenceError(NeuralflowError, FloatingPointError):
    """A run (GD or an ODE solve) produced non-finite numbers.

    ``partial`` holds what was computed before the failure (a ``Trajectory`` for GD), so
    nothing the user paid for is lost.
    """

    def __init__(self, message: str, partial: object = None) -> None:
        super().__init__(message)
        self.partial = partial


class FileFormatError(NeuralflowError, OSError):
    """A saved file is truncated, tampered with, or from an unsupported format version."""


class EngineError(NeuralflowError, RuntimeError):
    """A sweep's engine cannot run tasks (Ray missing or unreachable, workers dying); finished runs are kept."""


class Interrupted(KeyboardInterrupt):
    """A long run was interrupted (Ctrl-C, or SIGTERM from the command line); nothing computed is lost.

    ``partial`` holds what was computed (a ``Trajectory`` for GD, the best ``FitResult`` so far for
    a fit); ``checkpoint`` is the file a resumable run wrote, if any. A ``KeyboardInterrupt``, so
    code that stops on Ctrl-C keeps stopping.
    """

    def __init__(self, message: str, partial: object = None, checkpoint: object = None) -> None:
        super().__init__(message)
        self.partial = partial
        self.checkpoint = checkpoint
