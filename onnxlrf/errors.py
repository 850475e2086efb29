"""The one exception type users see: a one-line message naming the problem."""


class OnnxlrfError(Exception):
    """A problem with the user's input (file, model, data, plan, options).

    The CLI prints ``Error: <message>`` on one line and exits with status 1;
    library callers can catch it to tell bad input from bugs.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type where it has none): libraries that raise multi-line
    text (onnxruntime, onnx's checker and reference evaluator) get one line in ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
