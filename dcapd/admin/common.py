"""What every ``dcapd-admin`` command shares: its error, its files (atomic writes, reading
JSON), dcapd's configuration from the admin's options, and the progress bar."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from typing import Any, TextIO

from .. import __version__
from ..config import SETTINGS, Config, ConfigError, load_config

PROG = "dcapd-admin"
USER_AGENT = f"dcapd-admin/{__version__}"
# dcapd settings the admin takes from the environment, and their variables.
ENV = {
    s.name: s.env for s in SETTINGS if s.name in ("api_key", "url_map", "cache_dir", "cache_url")
}

_ERRNO = re.compile(
    r"\[Errno -?\d+\] [^'\")\]]+|Connection refused|Name or service not known|"
    r"timed out|Remote end closed connection without response"
)


class AdminError(Exception):
    """What went wrong, as the one line ``dcapd-admin`` prints on stderr (exit status 1)."""


class SettingError(AdminError):
    """An unusable option, setting or path (a file that cannot be read or written, a bad
    ini file): the one line names it; exit status 2."""


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 platform``, ``2 platforms``."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def write_atomic(path: str, data: bytes) -> None:
    """Write ``path`` so that it is either the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, temp = tempfile.mkstemp(prefix=".dcapd-admin-", dir=directory)
    except OSError as exc:
        raise SettingError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except OSError as exc:
        raise SettingError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def check_writable(path: str) -> None:
    """Fail before a destructive request if the output cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise SettingError(f"cannot write {path}: directory {directory} is not writable")


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise SettingError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AdminError(f"{path}: not UTF-8 text") from None


def read_json(path: str) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise AdminError(f"{path}: not valid JSON ({exc})") from None


def reason(exc: BaseException) -> str:
    """The useful part of a requests exception (its str() nests several layers)."""
    match = _ERRNO.search(str(exc))
    return match.group(0) if match else type(exc).__name__


def dcapd_config(options: dict[str, tuple[str, object]]) -> Config:
    """dcapd's Config (:func:`dcapd.config.load_config`, its parsers and defaults) from the
    admin's options: ``{setting name: (option, value or None)}``. A setting in ``ENV`` the
    option does not give comes from its environment variable; nothing else is read (no other
    variable, no ini file). A refused value is an error naming the option."""
    environ = {
        ENV[name]: os.environ[ENV[name]]
        for name in options
        if name in ENV and ENV[name] in os.environ
    }
    try:
        return load_config({name: value for name, (_, value) in options.items()}, environ=environ)
    except ConfigError as exc:
        option = options[exc.setting][0] if exc.setting in options else exc.key
        raise SettingError(f"{option}: {exc.problem}") from None


class Progress:
    """Progress on stderr: a one-line bar redrawn in place when it is a terminal; otherwise
    only the lines given to :meth:`line` (one per platform, say), so a log file shows them."""

    def __init__(self, stream: TextIO | None = None, width: int = 28):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self.width = width
        self.total = 0
        self.done = 0
        self.label = ""
        self._drawn = 0

    def add(self, count: int) -> None:
        self.total += count
        self._draw()

    def step(self, label: str) -> None:
        self.done += 1
        self.label = label
        self._draw()

    def line(self, text: str) -> None:
        """A line of its own when there is no bar (which says as much)."""
        if not self.enabled:
            self._write(text)

    def announce(self, text: str) -> None:
        """A line of its own in any case (the bar is drawn again below it)."""
        self._write(text)

    def _write(self, text: str) -> None:
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()
        self._draw()

    def _draw(self) -> None:
        if not self.enabled or not (self.total or self.done):
            return
        total = max(self.total, self.done, 1)
        filled = int(self.width * self.done / total)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{total} {self.label[:40]}"
        )
        self.stream.write("\r" + line.ljust(self._drawn))
        self.stream.flush()
        self._drawn = len(line)

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0
