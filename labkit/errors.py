"""The one exception type users see: the CLI prints its message on one line and exits 2."""


class LabkitError(Exception):
    """Bad input or an unusable environment, explained in one line."""
