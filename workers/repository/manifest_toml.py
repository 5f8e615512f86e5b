"""Writing ``model.toml``: the manifest's small, fixed layout, read back by ``tomllib``.

No TOML writer is a dependency, and the layout is fixed: top-level keys (the known ones
first, in a stable order), ``[[inputs]]``, ``[[outputs]]``, then ``[versions.N]`` in
version order. Any value ``tomllib`` reads (strings, numbers, booleans, dates, arrays,
tables) is written back inline. Comments above top-level keys survive a rewrite; other
comments do not.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: Top-level keys in the order they are written; others follow in the document's order.
TOP_KEYS = ("description", "max_batch_rows", "max_wait_ms", "max_queue", "instances")
_TABLES = ("inputs", "outputs", "versions")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_LINE = re.compile(r'^\s*([A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")\s*=')


def key(name: str) -> str:
    """A TOML key: bare when it can be, else a quoted string."""
    return name if _BARE_KEY.match(name) else _string(name)


def _string(text: str) -> str:
    # A JSON string is a TOML basic string, except that TOML also escapes DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def value(obj: Any) -> str:
    """One TOML value, inline."""
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return repr(obj)
    if isinstance(obj, str):
        return _string(obj)
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(value(v) for v in obj) + "]"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{key(str(k))} = {value(v)}" for k, v in obj.items()) + "}"
    raise TypeError(f"cannot write {type(obj).__name__} to TOML")


def top_comments(text: str) -> dict[str, list[str]]:
    """The comment lines directly above each top-level key of a manifest, by key."""
    found: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            break  # the first table: top-level keys end here
        if stripped.startswith("#"):
            pending.append(stripped)
            continue
        match = _KEY_LINE.match(line)
        if match:
            name = match.group(1)
            found[json.loads(name) if name.startswith('"') else name] = pending
        pending = [] if stripped or not pending else pending
    return found


def dumps(doc: Mapping[str, Any], comments: Mapping[str, Sequence[str]] | None = None) -> str:
    """``doc`` (a manifest as ``tomllib`` reads it) as TOML text.

    ``comments`` gives comment lines (each starting with ``#``) to write above top-level keys.
    """
    comments = comments or {}
    lines: list[str] = []
    names = [k for k in TOP_KEYS if k in doc]
    names += [k for k in doc if k not in TOP_KEYS and k not in _TABLES]
    for name in names:
        lines += list(comments.get(name, ()))
        lines.append(f"{key(name)} = {value(doc[name])}")
    for table in ("inputs", "outputs"):
        for entry in doc.get(table) or ():
            lines += ["", f"[[{table}]]"]
            lines += [f"{key(str(k))} = {value(v)}" for k, v in entry.items()]
    versions = doc.get("versions") or {}
    for number in sorted(versions, key=lambda v: (int(v) if str(v).isdigit() else -1, str(v))):
        lines += ["", f"[versions.{key(str(number))}]"]
        lines += [f"{key(str(k))} = {value(v)}" for k, v in versions[number].items()]
    return "\n".join(lines).lstrip("\n") + "\n"
