"""The one exception type for a user's own mistake.

The command line catches it and prints its message as one line with a non-zero exit, never a
traceback: unknown stage, missing checkpoint, bad ``--data``, unwritable ``--out``, an unknown word.
"""


class UserError(Exception):
    """A mistake in what the user asked for; the message says what is wrong and what is accepted."""
