"""The one exception type the library raises for bad input, and its warning."""


class Llama2Error(Exception):
    """A user-facing error: bad input, a broken file, an impossible request.

    The command line prints its message as one line and exits non-zero; library users
    catch it to tell their own mistakes from bugs.
    """


class Llama2Warning(UserWarning):
    """Something suspicious but usable in the input (NaN weights, a tokenizer left behind).

    The command line prints its message as one line prefixed ``llama2: warning:``.
    """
