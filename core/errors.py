"""The error hierarchy, at the bottom of the package graph: it imports nothing of quantfarm, so the
algorithms, calibration and evaluation raise these without knowing about the service. Every failure
a user can cause or fix is one of these; the message says what to do. The API maps each class to an
HTTP status (service/farm/api.py), the CLI prints the message, a job records it."""


class QuantfarmError(Exception):
    """Base class of every error quantfarm raises on purpose."""


class SpecError(QuantfarmError):
    """The request itself is invalid (bad bits, unknown format, incompatible options)."""


class ModelSourceError(QuantfarmError):
    """The model cannot be resolved or loaded (not found, gated, offline, unsafe weights)."""


class UnsafeModelError(ModelSourceError):
    """The model needs pickle weights or remote code and the job did not allow it."""


class CalibrationError(QuantfarmError):
    """The calibration data cannot be built (missing file, too little text, offline dataset)."""


class QuantizationError(QuantfarmError):
    """The algorithm cannot proceed (unsupported architecture, numerical failure)."""


class ArtifactError(QuantfarmError):
    """An artifact is missing, incomplete, or of a layout we cannot read."""


class NotImplementedFeature(QuantfarmError):
    """A feature that is designed but not built yet; says so instead of faking it."""


class EvaluationError(QuantfarmError):
    """An evaluation cannot run (missing task data, unknown task, no baseline to compare with)."""


class StorageError(QuantfarmError):
    """An output or store location cannot take what is to be written (not writable, too little space)."""


class PublishError(StorageError):
    """Copying a finished artifact to its publish target failed; the local artifact is kept and the
    publish can be retried."""
