"""The one exception type the library raises for bad input."""


class Llama2Error(Exception):
    """A user-facing error: bad input, a broken file, an impossible request.

    The command line prints its message as one line and exits non-zero; library users
    catch it to tell their own mistakes from bugs.
    """
