"""The error type raised for bad input data."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: an unreadable file, a missing pair, a size mismatch.

    The message always starts with the offending file (or folder) so that a user can find it.

    Attributes:
        path: The file or folder at fault, when known.
        reason: What is wrong with it, without the path (used in skip reports).
    """

    def __init__(self, message: str, *, path: str | Path | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.reason = reason if reason is not None else message

    @classmethod
    def at(cls, path: str | Path, reason: str) -> DataError:
        """Build an error whose message is ``"<path>: <reason>"``.

        Args:
            path: The file or folder at fault.
            reason: What is wrong with it.

        Returns:
            The error (to be raised by the caller).
        """
        return cls(f"{path}: {reason}", path=path, reason=reason)
