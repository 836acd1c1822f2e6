"""JSON-lines files: strict reading (errors name the file and line), appending, atomic writing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]


class JsonlError(ValueError):
    """A malformed JSON-lines file; the message names the file and the 1-based line number."""


def read_jsonl(path: PathLike, required: Sequence[str] = (), allow_partial_tail: bool = False) -> list[dict[str, Any]]:
    """Read one JSON object per line.

    Parameters
    ----------
    path : path of the file.
    required : keys every object must have.
    allow_partial_tail : bool
        Ignore a last line that has no trailing newline and does not parse: what an
        interrupted append leaves behind. Any other bad line is an error.

    Raises
    ------
    JsonlError
        ``"<file>:<line>: ..."`` for a line that is not a JSON object or lacks a required key.
    """
    path = Path(path)
    records = []
    with open(path, "r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # split() leaves "" after a final newline; a non-empty last piece has no newline
    tail_unterminated = lines[-1] != ""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if allow_partial_tail and tail_unterminated and lineno == len(lines):
                break
            raise JsonlError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise JsonlError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in required if k not in obj]
        if missing:
            raise JsonlError(f"{path}:{lineno}: missing field(s) {missing}; required: {list(required)}")
        records.append(obj)
    return records


def repair_tail(path: PathLike) -> None:
    """Cut an unterminated last line (an interrupted append) so that appends start on a fresh line."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)


def append_jsonl(path: PathLike, record: dict[str, Any]) -> None:
    """Append one record and flush it to disk, so an interrupted run loses at most this line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write all records atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> None:
    """Write a JSON document atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
