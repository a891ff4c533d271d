"""Errors a user acts on; each message names the problem and the fix. Import-light on purpose."""


class MigrationError(RuntimeError):
    """A stage failed for a reason the user must act on; the message says which and how."""


class ConnectionProblem(MigrationError):
    """A connection cannot be made; the message names the connection and the cause."""


class ValidationFailed(MigrationError):
    """A check of the migrated data failed; the message says which and by how much."""
