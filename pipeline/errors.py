"""Errors a user can fix (bad params, bad data, missing device): reported in one line, exit code 2."""


class UserError(Exception):
    """A problem in the user's inputs or environment, not a bug: shown without a traceback."""
