"""``UserError``: the one base of the errors that are the user's to fix, and how the commands report them.

Every command line (``kd-cache``, ``kd-train``, ``kd-eval``, ``kd-demo``) catches ``USER_ERRORS`` in one
place (``cli.options.user_errors``) and prints ``<command>: error: <message>``, exit code 2, with no
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave (a flag, the data, a model, a cache, an output folder, a store) cannot be
    used. The message says what was expected, what was found and what to do."""


# What the command lines report as a user error: the project's own errors, and the standard exceptions
# its checks of user input raise (a config's ``__post_init__``, a path that does not exist).
USER_ERRORS = (UserError, ValueError, TypeError, FileNotFoundError)
