"""The one exception type that the command line reports without a traceback.

Raise `UserError` for anything the user can fix (a missing data folder, a
malformed list file, a config value out of range); the message must say what
is wrong and how to fix it. Programming errors keep their tracebacks.
"""


class UserError(Exception):
  """An error in the user's input, config or files, with a fix in its text."""


class DataError(UserError, FileNotFoundError):
  """A data folder, list file or image is missing or malformed."""


def first_line(e, limit=200) -> str:
  """The first non-empty line of exception `e`'s message (its type's name
  when it has none), at most `limit` characters: a failure named in a
  one-line error."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return (lines[0] if lines else type(e).__name__)[:limit]


def last_line(e) -> str:
  """The last non-empty line of `e`'s message (ml_collections' errors list
  the paths they tried first: the last line names the problem)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__
