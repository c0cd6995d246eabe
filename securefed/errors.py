"""Exceptions that describe a user's mistake or a bad peer, never a bug of securefed's own process.

The CLI prints any `SecurefedError` as one line and exits with code 2. Everything
else is a bug and keeps its traceback; a client's bug that stops an in-process job
travels as `ClientBug` (then `JobFailed`), its traceback kept for the run's errors.log.
"""

import traceback


class SecurefedError(Exception):
    """Base of every error that is reported to the user as one line."""


class ConfigError(SecurefedError):
    """The job TOML is missing, malformed or names an invalid value."""


class DataError(SecurefedError):
    """A dataset file is missing, unreadable or does not fit the job."""


class ModelError(SecurefedError):
    """A model cannot be found, loaded or adapted, or its spec does not match."""


class ProtocolError(SecurefedError):
    """A message from a peer is malformed, too large or out of order."""


class RunDirError(SecurefedError):
    """A run directory cannot be created, or cannot be resumed as asked."""


class RoundAborted(SecurefedError):
    """A round could not complete (for example too many dropouts); the job goes on."""


class SetupFailed(SecurefedError):
    """The secure-sum setup could not complete, so no round can run."""


class WatermarkError(SecurefedError):
    """A watermark key is missing, malformed, altered, or made for another model."""


class UpdateRefused(SecurefedError):
    """A client will not send its update as it is (not finite, or outside what the secure sum can carry)."""


class ClientBug(SecurefedError):
    """A client in this process raised something other than a SecurefedError: a bug, which stops the job instead
    of passing for a dropout. `details` holds its traceback."""

    def __init__(self, client: int, exc: BaseException):
        self.details = "".join(traceback.format_exception(exc))
        super().__init__(f"client {client} failed with {type(exc).__name__}: {exc}".splitlines()[0])


class JobFailed(SecurefedError):
    """The job cannot end well: a client failed with a bug, or every round aborted."""
