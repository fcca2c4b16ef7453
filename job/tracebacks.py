"""Tracebacks for the developer of a handler: without bulkjob's own frames on top, and the place
an error was raised in a few words.

Pure: text in, text out (the traceback of a live exception is only walked, never kept).
"""

from __future__ import annotations

import os
import re
import traceback
from types import TracebackType

#: Frames on top of a handler's traceback that are bulkjob's or the import machinery's, not the
#: handler's: the worker that called it, and importlib when the handler's module was imported.
_OWN_FILES = (os.path.join("job", "worker.py"), os.path.join("importlib", "__init__.py"))
_FROZEN_IMPORTLIB = "<frozen importlib"
#: A frame line of a formatted traceback: `  File "path", line 12, in name`.
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)$', re.MULTILINE)


def _own(filename: str) -> bool:
    return filename.startswith(_FROZEN_IMPORTLIB) or filename.endswith(_OWN_FILES)


def _without_own_frames(tb: TracebackType | None, *, keep_if_alone: bool) -> TracebackType | None:
    first = tb
    while tb is not None and _own(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return first if tb is None and keep_if_alone else tb


def handler_traceback(exc: BaseException, *, importing: bool = False) -> str:
    """The formatted traceback of `exc`, starting at the handler's first frame.

    An error bulkjob raised itself (no frame of the handler's) keeps its whole traceback, except
    while importing: a SyntaxError then shows only its file, line and caret.
    """
    tb = _without_own_frames(exc.__traceback__, keep_if_alone=not importing)
    return "".join(traceback.format_exception(type(exc), exc, tb))


def short_path(path: str, cwd: str | None = None) -> str:
    """`path` relative to the current directory when it is inside it, else as it is."""
    cwd = cwd if cwd is not None else os.getcwd()
    if os.path.isabs(path) and path.startswith(cwd.rstrip(os.sep) + os.sep):
        return path[len(cwd.rstrip(os.sep)) + 1:]
    return path


def raised_at(trace: str | None, cwd: str | None = None) -> str | None:
    """Where the last exception of a formatted traceback was raised, as `myh.py line 3, in handle`;
    None when the text names no frame."""
    if not trace:
        return None
    frames = [m for m in _FRAME.finditer(trace) if not _own(m["file"])]
    if not frames:
        return None
    last = frames[-1]
    return f"{short_path(last['file'], cwd)} line {last['line']}, in {last['name']}"


def import_failure_at(exc: BaseException, cwd: str | None = None) -> str | None:
    """Where importing a module failed: the file and line of a SyntaxError, else the innermost
    frame that is not the import machinery's."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{short_path(exc.filename, cwd)} line {exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _own(f.filename)]
    if not frames:
        return None
    return f"{short_path(frames[-1].filename, cwd)} line {frames[-1].lineno}"
