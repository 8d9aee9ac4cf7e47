"""File contents on local disk, and the line-by-line reading and checking of batch input files.

Contents live at ``<files_dir>/<file id>``. A file is written to a temporary name, flushed to
disk and renamed, so a file that exists under its id is complete. Input files are read one
line at a time (``iter_lines``): a 50,000-line file is never all in memory.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from qlm_opt.server.openai_protocol import ChatCompletionRequest, CompletionRequest

ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
MAX_REPORTED_ERRORS = 100  # validation errors listed in the batch's ``errors``


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


class FileStorage:
    """Contents of stored files under one folder."""

    def __init__(self, files_dir: str) -> None:
        self.dir = Path(files_dir).expanduser().resolve()

    def ensure(self) -> None:
        """Create the folder (on first use, so a server that never sees a batch writes
        nothing)."""
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.dir / file_id

    def temp_path(self) -> Path:
        return self.dir / f".tmp-{uuid.uuid4().hex}"

    def commit(self, tmp: Path, file_id: str) -> Path:
        """Flush ``tmp`` to disk and move it to the file's place; returns that path."""
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dst = self.path(file_id)
        os.replace(tmp, dst)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return dst

    def remove(self, path: str | Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def iter_lines(path: str | Path, start_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without its newline) from ``start_line`` on; blank lines
    are skipped (they are not requests) but keep their numbers."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n < start_line:
                continue
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield n, line


@dataclass(slots=True)
class LineError:
    """A line that cannot run; it goes to the error file with its line number."""

    line_no: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None


@dataclass(slots=True)
class ParsedLine:
    line_no: int
    custom_id: str
    body: ChatCompletionRequest | CompletionRequest


class BatchInputError(Exception):
    """The whole input file is refused (a 400 at ``POST /v1/batches``, nothing stored)."""

    def __init__(self, message: str, code: str, param: str | None = None,
                 line_no: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param
        self.line_no = line_no


def parse_line(line_no: int, raw: bytes, endpoint: str) -> ParsedLine | LineError:
    """One input line: ``{"custom_id", "method": "POST", "url", "body"}``. A line that is not
    a valid request is a ``LineError``; a line whose ``url`` is another endpoint raises
    ``BatchInputError`` (the file does not belong to this batch)."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        return LineError(line_no, None, "invalid_json_line",
                         f"line {line_no}: not valid JSON ({msg})")
    if not isinstance(obj, dict):
        return LineError(line_no, None, "invalid_json_line",
                         f"line {line_no}: expected a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return LineError(line_no, None, "missing_custom_id",
                         f"line {line_no}: 'custom_id' must be a non-empty string",
                         "custom_id")
    url = obj.get("url")
    if url != endpoint:
        raise BatchInputError(
            f"line {line_no}: url {url!r} does not match the batch's endpoint '{endpoint}'",
            "invalid_url", "url", line_no)
    method = obj.get("method", "POST")
    if method != "POST":
        return LineError(line_no, cid, "invalid_method",
                         f"line {line_no}: method must be POST, got {method!r}", "method")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(line_no, cid, "invalid_body",
                         f"line {line_no}: 'body' must be a JSON object", "body")
    try:
        req = ENDPOINTS[endpoint].model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return LineError(line_no, cid, "invalid_request",
                         f"line {line_no}: body.{loc}: {first.get('msg', 'invalid')}",
                         f"body.{loc}")
    return ParsedLine(line_no, cid, req)


@dataclass(slots=True)
class Checked:
    """What checking an input file found."""

    num_lines: int = 0  # request lines (blank lines are not counted)
    errors: list[LineError] = field(default_factory=list)


def check_input(path: str | Path, endpoint: str, known_model: Callable[[str], bool],
                max_lines: int) -> Checked:
    """Read the whole input file once, line by line, before a batch is created. Raises
    ``BatchInputError`` for what refuses the whole file: no request lines, more than
    ``max_lines``, a line for another endpoint, an unknown model, a repeated ``custom_id``.
    Runs in a worker thread (it reads the disk)."""
    out = Checked()
    seen: set[str] = set()  # custom ids (ids only; the lines are not kept)
    for line_no, raw in iter_lines(path):
        out.num_lines += 1
        if out.num_lines > max_lines:
            raise BatchInputError(f"the file has more than {max_lines} requests",
                                  "too_many_lines", "input_file_id", line_no)
        p = parse_line(line_no, raw, endpoint)
        if isinstance(p, LineError):
            out.errors.append(p)
            if p.custom_id is not None:
                if p.custom_id in seen:
                    raise _duplicate(p.custom_id, line_no)
                seen.add(p.custom_id)
            continue
        if p.custom_id in seen:
            raise _duplicate(p.custom_id, line_no)
        seen.add(p.custom_id)
        if not known_model(p.body.model):
            raise BatchInputError(
                f"line {line_no}: the model '{p.body.model}' does not exist",
                "model_not_found", "body.model", line_no)
    if out.num_lines == 0:
        raise BatchInputError("the input file has no requests", "empty_file", "input_file_id")
    return out


def _duplicate(cid: str, line_no: int) -> BatchInputError:
    return BatchInputError(f"line {line_no}: custom_id {cid!r} is used by an earlier line",
                           "duplicate_custom_id", "custom_id", line_no)
