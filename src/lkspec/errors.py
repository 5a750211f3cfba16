"""One exception type for every bad input a user can fix.

The CLI prints it as a single line (no traceback) and exits with status 2, so every message must
say what is wrong *and* what to do about it.
"""


class LkspecError(ValueError):
    """A user-fixable problem; the message names the fix."""


class NoServedLayoutError(LkspecError):
    """The draft is valid but the requested serving layout cannot express it (the message says what can)."""
