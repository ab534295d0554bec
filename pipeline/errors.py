"""Errors a user can act on. Stage scripts print their message in one place and exit non-zero, no traceback."""


class PipelineError(Exception):
    """Base class: the message says what, where, and what to do."""


class ConfigError(PipelineError):
    """params.yaml or an override holds a bad value."""


class DataError(PipelineError):
    """Input data is missing, unsafe, in the wrong layout, or too damaged to use."""


class ModelError(PipelineError):
    """A model or weights file cannot be built or loaded."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or used."""


class TuneError(PipelineError):
    """The tuning study cannot be used (storage unreachable, driver missing, no study to join)."""
