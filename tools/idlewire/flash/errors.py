"""Errors of a flash that carry their facts: which target, and whether any byte reached it.

The CLI decides what to say from these fields, never from the message text.
"""

from __future__ import annotations

from ..errors import UserError


class FlashError(UserError):
    """A refusal or failure of `flash`.

    `written`: False when no target got a byte (the message ends "; nothing written"), True when
    a target was (partly) written, None when nothing was to be written (--verify-only).
    `target`: the device or file concerned, when there is one.
    """

    def __init__(self, reason: str, *, target: object | None = None, written: bool | None = False):
        self.reason, self.target, self.written = reason, None if target is None else str(target), written
        super().__init__(reason + ("; nothing written" if written is False else ""))


def before_writing(exc: UserError, *, verify_only: bool = False) -> FlashError:
    """`exc` (from a check that ran before any write) as a FlashError with written=False."""
    if isinstance(exc, FlashError):
        return exc
    return FlashError(str(exc), written=None if verify_only else False)


class VerifyError(Exception):
    """The target does not hold what was written (exit 1)."""
