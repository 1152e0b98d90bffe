"""The project's own exception types: each carries one clear line (what, where, what to do)."""
from __future__ import annotations


class GlobeError(Exception):
    """Base class of every error GloBE raises on purpose; the CLI prints its message as one line."""


class ModelDirError(GlobeError):
    """The model directory is missing, or lacks config.json / weight files."""


class ConfigError(GlobeError):
    """A configuration (config.json or a GloBE config) is invalid or out of range."""


class UnsupportedArchitectureError(GlobeError):
    """config.model_type is not in the architecture registry."""


class CheckpointError(GlobeError):
    """A shard is missing, truncated or corrupt, or a tensor is absent."""


class ShapeError(GlobeError):
    """Tensors have inconsistent or unexpected shapes."""


class NumericalError(GlobeError):
    """NaN/Inf found in weights or produced during fitting."""


class ArtifactError(GlobeError):
    """A GloBE artifact is missing, corrupt, from a newer format, or does not match the model."""


class OutputError(ArtifactError):
    """An output (-o) cannot be written safely: it holds the user's data, is an input, or another run uses it."""


class RemoteCodeError(ConfigError):
    """A checkpoint asks for custom code (config.json `auto_map`), which globe never runs."""


def refuse_first(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first (ok, message) check that failed; a config's validate()."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
