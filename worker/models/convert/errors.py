"""The one error type of the converter: the worker exits 3 with its message."""

from __future__ import annotations

from worker.models.resolve import ModelResolveError


class ConvertError(ModelResolveError):
    """A SafeTensors checkpoint cannot become a GGUF; the message names the file or tensor and the reason."""
