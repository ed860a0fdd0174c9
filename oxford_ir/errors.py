"""Errors a user can fix.

Every exception raised at a boundary (files, ground truth, config values,
checkpoints, downloads) derives from :class:`OxfordIRError`; its message names
the file or key at fault and what to do. Command-line entry points print such
errors as one line instead of a traceback.
"""

from __future__ import annotations


class OxfordIRError(Exception):
    """Base class: a problem with the user's input, with a message that says how to fix it."""


class DataError(OxfordIRError):
    """A dataset folder, image or image list is missing or unreadable."""


class GroundTruthError(DataError):
    """A ground-truth file is missing, malformed or inconsistent with the image list."""


class UnsafePickleError(GroundTruthError):
    """A pickle asked to build something other than plain data; it was refused, not executed."""


class DownloadError(OxfordIRError):
    """A download, checksum or archive extraction failed."""


class ConfigError(OxfordIRError):
    """A configuration value is invalid."""


class CheckpointError(OxfordIRError):
    """A checkpoint is corrupt or belongs to another model."""


class IndexFormatError(OxfordIRError):
    """An image index folder is missing, corrupt, busy, or was built with another model or settings."""


def exit_on_user_error(func):
    """Wrap a command-line entry point: print an :class:`OxfordIRError` as one line and exit 2, no traceback."""
    import functools
    import sys

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as error:
            cause = user_error_in(error)
            if cause is None:
                raise
            print(f"error: {cause}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def user_error_in(error: BaseException) -> OxfordIRError | None:
    """The :class:`OxfordIRError` behind ``error``, also when a library wrapped it (Hydra's instantiate does)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OxfordIRError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
