"""Errors that name their culprit: a slide, a file, a parameter key.

The CLI prints `PathgenError`s as one line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class PathgenError(Exception):
    """A failure caused by the input, not by the code: printed as one line."""


class ConfigError(PathgenError):
    """params.yaml or the slide manifest is malformed."""


class SlideError(PathgenError):
    """A slide file is missing, cannot be opened or read, or lacks what a step needs (e.g. mpp).

    Like ReportError, an input error of one slide: it quarantines the slide (params.yaml on_slide_error).
    """


class ReportError(PathgenError):
    """A pathology report file is missing, unreadable, binary, or in no encoding that explains its bytes."""


class ModelError(PathgenError):
    """A model checkpoint or config is missing or cannot be loaded."""
