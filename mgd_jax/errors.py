"""Errors that are the user's input, reported by ``train.py`` as one line (no stack trace)."""
from mgd_jax.config_validation import ConfigError
from mgd_jax.data.sources import DatasetNotFoundError
from mgd_jax.methods import MethodPairError
from mgd_jax.train.checkpoint import DiskFullError, StageMismatchError
from mgd_jax.train.metrics import NonFiniteLossError

from mgd_jax.import_torch import CheckpointImportError

USER_ERRORS = (ConfigError, DatasetNotFoundError, MethodPairError, StageMismatchError, NonFiniteLossError,
               CheckpointImportError, DiskFullError)
