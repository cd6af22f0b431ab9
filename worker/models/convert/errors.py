"""The one error type of the converter: the worker exits 3 with its message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.models.errors import ModelResolveError


class ConvertError(ModelResolveError):
    """A SafeTensors checkpoint cannot become a GGUF; the message names the file or tensor and the reason."""


def read_json(path: Path, missing: str | None = None) -> dict[str, Any]:
    """A checkpoint's JSON file; when it is absent, {} or, given what its absence means, an error saying so."""
    if not path.is_file():
        if missing is None:
            return {}
        raise ConvertError(f"{path.parent}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConvertError(f"{path}: not valid JSON ({exc})") from None
