"""What a running cache job tells a person: a progress bar on a terminal, JSON lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

import orjson

log = logging.getLogger("teacher_farm.progress")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors (used when stderr is not a terminal)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: int = logging.INFO) -> None:
    """Plain lines on a terminal, JSON lines otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)


class Progress:
    """Lines and tokens written, tokens/s, and an ETA from the input bytes read."""

    def __init__(self, total_bytes: int | None, *, every_s: float = 10.0) -> None:
        self.total = total_bytes
        self.lines = self.tokens = self.offset = 0
        self.started = time.monotonic()
        self.every_s = every_s
        self._last_log = self.started
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(
                TextColumn("[bold]caching"),
                BarColumn(),
                TextColumn("{task.percentage:>5.1f}%"),
                TextColumn(
                    "{task.fields[lines]:,} lines  {task.fields[tokens]:,} tokens  {task.fields[rate]:,.0f} "
                    "tok/s"
                ),
                TimeRemainingColumn(),
                transient=True,
            )
            self._task = self._bar.add_task("cache", total=total_bytes, lines=0, tokens=0, rate=0.0)
            self._bar.start()

    def advance(self, lines: int, tokens: int, offset: int) -> None:
        """Count written rows; ``offset`` is how far into the input (bytes) the written lines reach."""
        self.lines += lines
        self.tokens += tokens
        self.offset = max(self.offset, offset)
        now = time.monotonic()
        rate = self.tokens / max(now - self.started, 1e-9)
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self.offset, lines=self.lines, tokens=self.tokens, rate=rate
            )
        elif now - self._last_log >= self.every_s:
            self._last_log = now
            fields = {
                "lines": self.lines,
                "tokens": self.tokens,
                "tokens_per_s": round(rate),
                "bytes_read": self.offset,
                "elapsed_s": round(now - self.started, 3),
            }
            if self.total:
                fields["percent"] = round(100 * self.offset / self.total, 1)
                if self.offset:
                    fields["eta_s"] = round((now - self.started) * (self.total - self.offset) / self.offset)
            log.info("progress", extra={"fields": fields})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
