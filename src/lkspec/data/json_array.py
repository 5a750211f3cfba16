"""Streaming one big JSON array whose file may be cut off, such as the bundled ShareGPT file (125 MB).

`json.load` needs the whole text and fails on a cut file, so the array is parsed as a stream by ijson's C
parser (yajl), keeping memory at about one element plus one chunk, and the stream simply ends where the
file does. It replaced a hand-written `raw_decode` loop: on the bundled ShareGPT file (cut mid-record)
both yield the same 17671 records, ijson in 0.26 s of CPU against 0.31 s (medians of 15 interleaved runs
in one process).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from lkspec.errors import LkspecError

JSON_SPACE = b" \t\r\n"
TAIL = 4096  # bytes searched for the opening bracket, and for a number cut by the end of the file
_CUT_NUMBER = re.compile(rb"[\[,][ \t\r\n]*([-+0-9.eE]+)\Z")


class _Upto:
    """A binary file read only up to `stop`, with invalid UTF-8 replaced by U+FFFD when `replace` is set."""

    def __init__(self, f: BinaryIO, stop: int, *, replace: bool = False) -> None:
        self.f, self.left = f, stop
        self.decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode if replace else None

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        while self.left > 0:
            data = self.f.read(self.left if n < 0 else min(n, self.left))
            self.left = self.left - len(data) if data else 0
            if self.decode is None:
                return data
            if text := self.decode(data):  # empty only while one character is split across reads
                return text.encode()
        return self.decode(b"", final=True).encode() if self.decode is not None else b""


def _as_json_loads(obj: Any) -> Any:
    """ijson's exact Decimals as the floats `json.loads` gives (containers are converted in place)."""
    if isinstance(obj, Decimal):
        return float(obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(v, dict | list | Decimal):
            obj[k] = _as_json_loads(v)
    return obj


def iter_json_array(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, stopping quietly where the file is cut off.

    The elements equal `json.loads` of the text up to the cut. Two things keep them so: a number running
    to the very end of a cut file may itself be cut (`3.14` cut to `3.`), so the file is read only up to
    its start; and when the fast pass stops for any reason but the cut (invalid UTF-8, an integer beyond
    64 bits, a syntax error), the file is parsed again the way a text read sees it — bad bytes as U+FFFD,
    numbers exact — and goes on after the elements already yielded. What is not JSON (NaN, `[1,,2]`) ends
    the stream there; a lone surrogate escape (`"\\ud800"`) comes back as `?`.
    """
    with open(path, "rb") as f:
        if not f.read(max(chunk_bytes, TAIL)).lstrip(JSON_SPACE).startswith(b"["):
            raise LkspecError(f"{path} does not start with a JSON array")
        size = f.seek(0, 2)
        f.seek(max(size - TAIL, 0))
        tail = f.read()
        cut = _CUT_NUMBER.search(tail)
        stop = size - len(tail) + cut.start(1) if cut else size
        f.seek(0)
        done = 0
        try:
            for obj in ijson.items(_Upto(f, stop), "item", use_float=True, buf_size=chunk_bytes):
                done += 1
                yield obj
            return
        except ijson.JSONError as exc:
            if "premature EOF" in str(exc):  # yajl's word for the cut; any other wording only costs the 2nd pass
                return
        f.seek(0)
        try:
            for i, obj in enumerate(ijson.items(_Upto(f, stop, replace=True), "item", buf_size=chunk_bytes)):
                if i >= done:
                    yield _as_json_loads(obj)
        except ijson.JSONError:
            return
