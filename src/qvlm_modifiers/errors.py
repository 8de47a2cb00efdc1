"""Exceptions with messages that name the problem and the fix.

Every user-facing failure of the plugin raises a subclass of :class:`QVLMError`; the CLI turns
them into a one-paragraph message and a non-zero exit code instead of a traceback.
"""


class QVLMError(Exception):
    """Base class: ``str(err)`` is a complete message for the user (problem + fix)."""

    exit_code = 2


class UnsupportedModelError(QVLMError):
    """The model's architecture is not a supported VLM family."""


class RecipeError(QVLMError):
    """A recipe is missing, not YAML, names an unknown Modifier/field, or asks for a scheme we can't do."""


class CalibrationDataError(QVLMError):
    """Calibration data is missing, empty, lacks images, or has a bad row."""


class OutputDirError(QVLMError):
    """The output directory exists and is not empty, or cannot be written."""


class CheckpointError(QVLMError):
    """A checkpoint cannot be read (truncated, corrupt safetensors, missing files)."""
