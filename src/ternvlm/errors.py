"""One exception type for problems the user can fix; the CLI prints it as a single line."""


class TernvlmError(Exception):
    """Bad input (missing checkpoint, unreadable image, unknown data set, ...)."""
