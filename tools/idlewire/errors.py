"""Errors a user can act on. The CLI prints them as one line and exits 2, never a traceback."""


class UserError(Exception):
    """Bad input or a missing prerequisite: the message names the file/field/tool and the fix."""

    exit_code = 2


class StageError(UserError):
    """A build stage failed; the message names the stage and its log file."""

    def __init__(self, stage: str, reason: str, log: object | None = None, last: str = ""):
        msg = f"stage '{stage}' failed: {reason}"
        if last:
            msg += f" (last output: {last})"
        if log:
            msg += f"; full log: {log}"
        super().__init__(msg)
        self.stage = stage
