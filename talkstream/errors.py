"""User-facing errors.

Anything raised as a ``TalkstreamError`` is a problem with the user's input or environment:
the CLI prints its message (no traceback) and exits with status 2. Everything else is a bug.
"""

from __future__ import annotations


class TalkstreamError(ValueError):
    """A problem the user can fix; the message says what and how."""


class InputError(TalkstreamError):
    """A bad input file: unreadable, wrong format, too large, no face found."""


class CheckpointError(TalkstreamError):
    """A checkpoint that cannot be loaded: corrupt, missing keys, config/weights mismatch."""


class MissingDependencyError(TalkstreamError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, what: str, module: str, extra: str) -> None:
        super().__init__(
            f"{what} needs the Python module '{module}', which is not installed. "
            f"Install it with: pip install 'talkstream[{extra}]'"
        )
        self.module = module
        self.extra = extra
