"""The error hierarchy. Every failure a user can cause or fix is one of these: the API maps them to a
4xx with the message, the CLI prints the message, a job records it. The message says what to do."""


class QuantfarmError(Exception):
    """Base class. `http_status` is what the API answers when this reaches a request."""
    http_status = 400


class SpecError(QuantfarmError):
    """The request itself is invalid (bad bits, unknown format, incompatible options)."""
    http_status = 422


class ModelSourceError(QuantfarmError):
    """The model cannot be resolved or loaded (not found, gated, offline, unsafe weights)."""
    http_status = 400


class UnsafeModelError(ModelSourceError):
    """The model needs pickle weights or remote code and the job did not allow it."""
    http_status = 403


class CalibrationError(QuantfarmError):
    """The calibration data cannot be built (missing file, too little text, offline dataset)."""


class QuantizationError(QuantfarmError):
    """The algorithm cannot proceed (unsupported architecture, numerical failure)."""
    http_status = 500


class ArtifactError(QuantfarmError):
    """An artifact is missing, incomplete, or of a layout we cannot read."""


class NotImplementedFeature(QuantfarmError):
    """A feature that is designed but not built yet; says so instead of faking it."""
    http_status = 501


class EvaluationError(QuantfarmError):
    """An evaluation cannot run (missing task data, unknown task, no baseline to compare with)."""


class StorageError(QuantfarmError):
    """An output or store location cannot take what is to be written (not writable, too little space)."""
    http_status = 507
