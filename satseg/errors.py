"""Errors that reach users as one line, never as a traceback."""


class SatInputError(ValueError):
    """Bad user input: a volume, a prompt, a file or an option.

    The message is one line that says what was wrong and what is accepted.
    CLIs print it as ``<prog>: error: <message>`` and exit with status 2;
    the server answers the request alone with INVALID_ARG.
    """


class CheckpointError(RuntimeError):
    """A checkpoint that does not match its config or the code (never loaded partially)."""


class ExportError(RuntimeError):
    """An export step that cannot be done here or failed its gate: no TensorRT, a plan built for another
    GPU or TensorRT version, a parity gate missed. The message names the way forward."""
