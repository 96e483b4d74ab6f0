"""User-facing errors: raised anywhere below the command layer, shown as one message with exit code 2."""


class DiffitError(Exception):
    """A problem with the user's input (preset, flag, file) that names the problem and its fix."""
