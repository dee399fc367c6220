"""Every error that is the user's input or environment, in one leaf module (it imports nothing from the package).

Each package raises from here; ``train.py`` and the command-line tools report any of ``USER_ERRORS`` as one line,
without a stack trace (and ``remove_if_unused`` the workdir a refused run created).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work (named field and value), found before anything is compiled or trained."""


class DatasetNotFoundError(RuntimeError):
    """The configured dataset is not where the config says (the message says how to build it, offline)."""


class MethodPairError(ValueError):
    """A distillation method that cannot work for the configured teacher / student pair (raised before training)."""


class StageMismatchError(ValueError):
    """A stage's checkpoints were made with another setup (the first differing config field is named)."""


class NonFiniteLossError(FloatingPointError):
    """A loss, gradient or parameter became NaN or infinite: the run stops before saving it."""


class DiskFullError(OSError):
    """No space left while writing a checkpoint or result (reported as one line; rerunning resumes)."""


class CheckpointImportError(ValueError):
    """A PyTorch checkpoint that does not fit the architecture it is imported as."""


class AnalysisError(ValueError):
    """An analysis tool's input (workdir, stage, option) that cannot work."""


def one_line(e: BaseException) -> str:
    """An error's message as the one line a command prints after ``error: `` (a message that spans lines, e.g.
    one quoting a library's, joined with '; ')."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(e).__name__


def remove_if_unused(folder: str, existed: bool) -> None:
    """After a refusal: a folder this run created (``existed`` False) that holds nothing but empty folders (and the
    XLA compilation cache's, ``.jax_cache``) is removed, so that a failed attempt leaves no empty workdir."""
    import os
    import shutil

    if existed or not os.path.isdir(folder):
        return
    for root, _, files in os.walk(folder):
        if files and os.path.relpath(root, folder).split(os.sep)[0] != ".jax_cache":
            return
    shutil.rmtree(folder, ignore_errors=True)


USER_ERRORS = (ConfigError, DatasetNotFoundError, MethodPairError, StageMismatchError, NonFiniteLossError,
               CheckpointImportError, DiskFullError, AnalysisError)
