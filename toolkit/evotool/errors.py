"""User-facing errors: one clear line, non-zero exit, nothing computed is lost."""

from __future__ import annotations


class EvotoolError(Exception):
    """An error caused by the user's input (bad model, image, layer, file...).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code``.
    """

    exit_code = 2


class InputError(EvotoolError):
    """Missing, corrupt or empty input data (images, manifests, datasets)."""


class ModelError(EvotoolError):
    """A model that cannot be loaded or whose architecture is not understood."""


class StageFileError(EvotoolError):
    """A stages.json that is missing, malformed, of another schema or of another model."""


class ConfigError(EvotoolError):
    """An option or config value outside its valid range."""


class HubError(EvotoolError):
    """The Hugging Face Hub cannot be reached or refuses a push (offline, no token, no access)."""
