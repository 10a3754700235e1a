"""The exception types for problems a user can fix.

The CLI turns an :class:`EngramError` into one short line on stderr (``error: ...``) and its ``exit_code``, with no
traceback: the message must name the bad value and say what to change.
"""


class EngramError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix. Exit code 2."""

    exit_code = 2


class NonFiniteError(EngramError):
    """Training produced NaN/Inf (loss, gradients or weights) and was stopped before a checkpoint could hold it.

    Exit code 3, so that a sweep driver can tell a diverged trial from a mistyped one."""

    exit_code = 3
