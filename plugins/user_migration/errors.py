"""Errors a user acts on; each message names the problem and the fix. Import-light on purpose."""


class MigrationError(RuntimeError):
    """A stage failed for a reason the user must act on; the message says which and how."""


class ConnectionProblem(MigrationError):
    """A connection cannot be made; the message names the connection and the cause.

    ``permanent`` problems (unknown connection, wrong password, missing role or database) fail the
    task at once; others (refused, timed out) may be a restart in progress and are retried.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class ValidationFailed(MigrationError):
    """A check of the migrated data failed; the message says which and by how much."""
