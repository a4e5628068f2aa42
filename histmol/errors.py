"""Error types. Every error that concerns a file names the file and the problem."""

from __future__ import annotations

from os import PathLike


class HistmolError(Exception):
    """Base of every error histmol raises on purpose."""


class FileProblem(HistmolError):
    """A problem with one named file or folder."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Two-argument constructor: pickle (for Dask workers, process pools) must call it so.
        return (type(self), (self.path, self.problem))


class BundleError(FileProblem):
    """A platform output bundle is missing a file or holds malformed data."""


class WSIError(FileProblem):
    """A whole-slide image cannot be opened, read or given a pixel size."""


class RegistrationError(HistmolError):
    """Units cannot be placed on the WSI (bad transform, mpp disagreement, units outside)."""


class QCError(HistmolError):
    """A section fails a quality-control check."""


class CorpusError(HistmolError):
    """The corpus on disk is inconsistent with a request (config clash, bad section id)."""


class ConfigError(HistmolError):
    """A build option is invalid."""
