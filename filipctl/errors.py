"""Errors the CLI reports as one clear message and a non-zero exit, without a traceback."""


class FilipctlError(Exception):
    """A user-facing error: the message says what is wrong, where, and how to fix it."""

    exit_code = 1


class RecipeError(FilipctlError):
    """A recipe (file, `extends:` chain or `--set` override) is invalid."""

    exit_code = 2


class UsageProblem(FilipctlError):
    """Options that cannot go together (the parser accepts each alone)."""

    exit_code = 2


class CannotRun(FilipctlError):
    """The run could never work where it is sent (a folder the other nodes cannot see, workers the cluster cannot
    place): refused before anything is queued."""

    exit_code = 2
