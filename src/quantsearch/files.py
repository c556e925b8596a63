"""Files: atomic writes (temporary file, then rename), and JSON reads checked against the schemas we ship.

A crash never leaves half a file; a file we read is data, validated before anything trusts it.
"""
from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "schema", "schema_problem", "read_json"]


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@lru_cache(maxsize=None)
def schema(name: str) -> dict:
    """The JSON Schema ``quantsearch/schemas/<name>.schema.json``."""
    return json.loads((resources.files("quantsearch") / "schemas" / f"{name}.schema.json").read_text())


def schema_problem(payload: Any, name: str) -> str | None:
    """Where and why ``payload`` violates schema ``name`` (``"at model/name: ..."``), or None when it conforms."""
    import jsonschema

    try:
        jsonschema.validate(payload, schema(name))
    except jsonschema.ValidationError as exc:
        return f"at {'/'.join(str(p) for p in exc.absolute_path) or '(top level)'}: {exc.message}"
    return None


def read_json(path: str | os.PathLike, what: str, error: type[Exception]) -> Any:
    """The JSON in ``path``; an unreadable file or invalid JSON raises ``error`` naming ``what`` and the path."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc}") from None
