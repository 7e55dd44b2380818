"""Logging set-up: one line per event, each with the Request-ID of the request behind it, as
text or as JSON (for log shippers). Nothing here ever formats a token or a key: callers never
pass them to a logger.

Every value that comes from a client or from upstream (a path, a header, a reason quoting
input) goes through :func:`escape` before it is logged, so it cannot end the line, start a
forged one, or send escape codes to a terminal."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING, TextIO

from .config import Config

if TYPE_CHECKING:  # generic for type checkers only (Python 3.9 at run time)
    _StreamHandler = logging.StreamHandler[TextIO]
else:
    _StreamHandler = logging.StreamHandler

# The request behind the current thread's work, set by the HTTP layer; service modules
# (collateral, pckcerts) note how they answered without importing the HTTP layer.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# How the request was answered from the cache: hit, selected (local PCK selection), upstream.
cache_outcome_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "cache_outcome", default="-"
)


# C0 and C1 controls, DEL, the Unicode line/paragraph separators, and the backslash itself
# (so that an escape in the log is never ambiguous with the same characters sent literally).
_UNSAFE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029\\\\]")


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(value: object) -> str:
    """``value`` as text safe for one log line: control characters (CR, LF, ESC, ...) and
    backslashes written as ``\\xNN`` / ``\\\\`` escapes; anything else unchanged."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


def note_cache_outcome(outcome: str) -> None:
    cache_outcome_var.set(outcome)


def new_request_id() -> str:
    """32 lower-case hex characters, like Intel's dash-less UUIDv4 (4x cheaper than uuid4)."""
    return os.urandom(16).hex()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every log record so one line ties to one request."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class SecondsMemo(logging.Formatter):
    """A Formatter whose ``formatTime`` formats the date once per second, not once per line:
    ``localtime`` and ``strftime`` were a tenth of an access line's cost. Same text."""

    _memo: tuple[int, str | None, str] = (-1, None, "")  # (second, datefmt, its text)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time_text(record.created, record.msecs, datefmt)

    def _time_text(self, created: float, msecs: float, datefmt: str | None) -> str:
        second = int(created)
        memo = self._memo  # one tuple, replaced whole: safe for concurrent threads
        if memo[0] == second and memo[1] == datefmt:
            text = memo[2]
        else:
            text = time.strftime(datefmt or self.default_time_format, self.converter(second))
            self._memo = (second, datefmt, text)
        if datefmt or not self.default_msec_format:
            return text
        return self.default_msec_format % (text, msecs)


class TextFormatter(SecondsMemo):
    """TEXT_FORMAT, the default: logging.Formatter's format, inlined for the usual record
    (no traceback, no stack), which is every access line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        try:
            return self._fmt % record.__dict__  # type: ignore[operator]
        except KeyError as exc:  # what logging.PercentStyle raises
            raise ValueError(f"Formatting field not found in record: {exc}") from None

    def line(self, name: str, levelname: str, message: str, request_id: str) -> str:
        """What :meth:`format` makes of a record with these fields made now (no traceback),
        without making the record (:class:`AccessLine`)."""
        created = time.time()
        msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
        fields = {
            "asctime": self._time_text(created, msecs, self.datefmt),
            "levelname": levelname,
            "name": name,
            "request_id": request_id,
            "message": message,
        }
        return self._fmt % fields  # type: ignore[operator]


class LineHandler(_StreamHandler):
    """Writes each record as one line with its Request-ID (what RequestIdFilter adds):
    logging.Handler's handle, filter, emit and flush in one call, as one access line is
    written per request. Same lines, same lock, errors reported as handleError does."""

    def handle(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if self.filters and not self.filter(record):
            return False
        try:
            self.write_line(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
        return True

    def write_line(self, text: str) -> None:
        line = text + self.terminator
        with self.lock:  # type: ignore[union-attr]  # StreamHandler made it
            stream = self.stream
            stream.write(line)
            stream.flush()


class AccessLine:
    """Writes a request's access line: what ``logger.info(fmt, *args, extra={"client":
    client})`` writes, at a fraction of its cost when the line goes only to dcapd's own text
    handler (the default set-up). logging's general path (a record, the logger's and the
    handler's checks) was most of an access line's cost, and the line a sixth of a cache
    hit's CPU in the server. Any other set-up (JSON lines, a handler or filter added by an
    embedding app or a test) gets ``logger.info``, the same line as before."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def __call__(self, fmt: str, args: tuple[object, ...], client: str) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handler = _only_text_handler(logger)
        if handler is None:
            logger.info(fmt, *args, extra={"client": client})
            return
        formatter = handler.formatter
        assert isinstance(formatter, TextFormatter)  # _only_text_handler checked it
        line = formatter.line(logger.name, "INFO", fmt % args, request_id_var.get())
        try:
            handler.write_line(line)
        except RecursionError:  # pragma: no cover - as in LineHandler.handle
            raise
        except Exception:
            handler.handleError(logging.makeLogRecord({"msg": line}))


def _only_text_handler(logger: logging.Logger) -> LineHandler | None:
    """The handler *logger*'s records reach, when that is only configure_logging's text
    LineHandler on the ``dcapd`` logger, with no filter anywhere on the way; else None."""
    if logger.handlers or logger.filters or not logger.propagate:
        return None
    parent = logger.parent
    if parent is None or parent.propagate or parent.filters or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if type(handler) is not LineHandler or handler.filters or handler.level > logging.INFO:
        return None
    return handler if type(handler.formatter) is TextFormatter else None


class JsonFormatter(SecondsMemo):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        client = getattr(record, "client", None)
        if client is not None:  # the access line's client address, as its own field
            document["client"] = client
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


def configure_logging(level: str = "info", verbose: bool = False, fmt: str = "text") -> None:
    """Configure the ``dcapd`` logger; ``verbose`` (DCAPD_VERBOSE) means debug."""
    # Neither format shows the caller's file, thread or process: not collecting them makes
    # the per-request line ~0.07 ms cheaper (measured: scripts/bench.py).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LineHandler()  # adds request_id, as RequestIdFilter does
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("dcapd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else getattr(logging, level.upper()))
    root.propagate = False
    # psycopg's pool (the PostgreSQL cache) says why it cannot connect: in dcapd's format.
    database = logging.getLogger("psycopg")
    database.handlers[:] = [handler]
    database.setLevel(logging.WARNING)
    database.propagate = False


def configure_from(config: Config) -> None:
    configure_logging(config.log_level, config.verbose, config.log_format)
