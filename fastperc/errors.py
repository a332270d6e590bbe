"""The project's error for input a caller can fix.

`InputError` is a ValueError, so `except ValueError` keeps working; it marks what fastperc itself found
wrong with what it was given (an argument, an option, a file, a combination of them) and names the
argument, what was expected and what came. The `fastperc` command prints such an error as one line
and exits with code 2; any other exception (a bug, an error raised inside a user's model, running out
of memory) keeps its type and shows its traceback.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input the caller can fix; the message names the argument, what was expected and what came.

    Example:
        >>> import fastperc
        >>> try:
        ...     fastperc.NoiseSchedule.scaled_linear(num_train_timesteps=0)
        ... except fastperc.InputError as e:
        ...     print(type(e).__name__, isinstance(e, ValueError))
        InputError True
    """


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder the caller named (or that an option implies) does not exist."""
