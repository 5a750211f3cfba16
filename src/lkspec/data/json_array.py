"""Streaming one big JSON array whose file may be cut off, such as the bundled ShareGPT file (125 MB).

`json.load` needs the whole text and fails on a cut file, so the array is decoded element by element and
the stream simply ends where the file does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lkspec.errors import LkspecError


def iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, stopping quietly where the file is cut off.

    A sliding text buffer is decoded with `json.JSONDecoder.raw_decode`; an element that does not decode
    yet is retried with more text, so memory stays at about one element plus one chunk.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, eof = f.read(chunk_chars), False
        pos = len(buf) - len(buf.lstrip())
        if not buf[pos:].startswith("["):
            raise LkspecError(f"{path} does not start with a JSON array")
        pos += 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated final element
                more = f.read(max(chunk_chars, len(buf) - pos))
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if end == len(buf) and not eof:  # a number might continue in the next chunk
                more = f.read(chunk_chars)
                eof = not more
                if more:
                    buf, pos = buf[pos:] + more, 0
                    continue
            if end == len(buf) and isinstance(obj, int | float) and not isinstance(obj, bool):
                return  # a number at the very end of a cut file may itself be cut
            yield obj
            pos = end
