"""The one exception type that the command line reports without a traceback.

Raise `UserError` for anything the user can fix (a missing data folder, a
malformed list file, a config value out of range); the message must say what
is wrong and how to fix it. Programming errors keep their tracebacks.
"""


class UserError(Exception):
  """An error in the user's input, config or files, with a fix in its text."""


class DataError(UserError, FileNotFoundError):
  """A data folder, list file or image is missing or malformed."""
