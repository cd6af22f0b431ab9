"""The model layer's errors: whatever the cause, the worker exits 3 with the message."""


class ModelResolveError(Exception):
    """The reference names nothing this worker can serve; the message says why."""
