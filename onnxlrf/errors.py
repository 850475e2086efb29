"""The one exception type users see: a one-line message naming the problem."""


class OnnxlrfError(Exception):
    """A problem with the user's input (file, model, data, plan, options).

    The CLI prints ``error: <message>`` on one line and exits with status 1;
    library callers can catch it to tell bad input from bugs.
    """
