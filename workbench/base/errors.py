"""Errors users see. Each says what went wrong and what to do instead."""


class WorkbenchError(Exception):
    """Base class of every error raised on purpose by workbench."""


class ModelLoadError(WorkbenchError):
    """The model source could not be found or loaded."""


class UnsupportedModelError(WorkbenchError):
    """The architecture lacks something workbench needs (named in the message)."""


class ProbeError(WorkbenchError, ValueError):
    """A probe or intervention asks for something the model or input does not have."""


class Cancelled(ProbeError):
    """A long computation was stopped from outside (the page's Cancel, a set cancel event): the one
    cancellation type of the dashboard, its model queue and the widgets' drill-downs."""

    stopped = True


class OutsideRootError(WorkbenchError):
    """A file or folder that resolves (through symlinks) outside the directory it must stay in, or a folder
    where a file is read (a folder's contents would be read as a dataset, links out included)."""
