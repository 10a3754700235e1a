"""The one exception type for mistakes a user can fix.

The CLI turns an :class:`EngramError` into a short message on stderr and exit code 2, with no traceback:
the message must name the bad value and say what to change.
"""


class EngramError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix."""
