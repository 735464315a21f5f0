"""The two kinds of failure a user can meet, and their exit codes.

Every error a user can cause is raised as one of these with a one-line message that says what
was wrong and how to fix it; the command line turns it into `attn: error: …` and the exit code.
"""


class AttnError(Exception):
    """A runtime failure: the request was well formed but could not be carried out (exit 1)."""

    exit_code = 1


class UsageError(AttnError):
    """The request itself is wrong: a bad option value, a bad combination, bad input (exit 2)."""

    exit_code = 2
