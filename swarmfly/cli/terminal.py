"""What a command shows: the progress bar on a TTY, one line per result, the one JSON
document of --json, and a failure in words with its exit status."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from swarmfly.errors import SwarmflyError

if TYPE_CHECKING:
    pass


def progress_line(done: int, total: int | None, elapsed: float, width: int = 30) -> str:
    """The bar as drawn after ``elapsed`` seconds: done, rate and ETA (only the bytes and the
    rate where the size is not known yet)."""
    rate = done / max(elapsed, 1e-6)
    speed = f"{rate / 2**20:7.1f} MiB/s"
    if not total:
        return f"{done / 2**20:9.1f} MiB {speed}"
    share = min(done / total, 1.0)
    filled = int(width * share)
    left = (total - done) / rate if rate > 0 else math.inf
    eta = f"{left:5.0f}s" if math.isfinite(left) else "    ?"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {100 * share:5.1f}%"
        f" {done / 2**20:.1f}/{total / 2**20:.1f} MiB {speed} ETA {eta}"
    )


class ProgressBar:
    """A one-line bar on a terminal's stderr, redrawn at most every ``REDRAW`` seconds."""

    REDRAW = 0.2

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.shown = -math.inf
        self.drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.shown >= self.REDRAW:
            self.shown = now
            self._draw(progress_line(done, total, now - self.started))

    def _draw(self, line: str) -> None:
        sys.stderr.write(f"\r\x1b[K{line}")
        sys.stderr.flush()
        self.drawn = True

    def close(self, done: int | None = None, summary: str | None = None) -> None:
        """End the bar's line; ``done``: the size of what finished, drawn at 100% (the last
        redraw may have been skipped, or the last progress report come before the end);
        ``summary``: a line saying what was done."""
        if done is not None:
            self._draw(progress_line(done, done, time.monotonic() - self.started))
        if self.drawn:
            sys.stderr.write("\n")
        if summary is not None:
            sys.stderr.write(summary + "\n")
        sys.stderr.flush()


def _progress(args: argparse.Namespace) -> ProgressBar | None:
    """A bar only for someone at a terminal: in a log or a pipe (or with --json or
    --no-progress) nothing is drawn."""
    if args.json or args.no_progress or not sys.stderr.isatty():
        return None
    return ProgressBar()


def _print_json(document: Mapping[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(document).decode() + "\n")
    sys.stdout.flush()


def _about(exc: SwarmflyError, subject: str) -> SwarmflyError:
    """``exc`` naming what it is about (a URL, an output path), unless its words already do:
    a service says what went wrong, the CLI knows with what."""
    if subject in exc.message:
        return exc
    return SwarmflyError(exc.code, f"{subject}: {exc.message}", path=exc.path)


ORIGIN_CODES = ("not_found", "source_error", "integrity", "timeout")
"""Error codes about a download's content: the message gets the URL it is about."""


def _cached(summary: Mapping[str, Any]) -> bool:
    """Whether this host already held it all: nothing came from the origin or from peers
    (said as such: "0.0 MiB from the origin, 0.0 MiB from peers" leaves the user asking
    where the bytes came from)."""
    return bool(summary["content_length"]) and not summary["bytes_origin"] + summary["bytes_p2p"]


def _sources(summary: Mapping[str, Any]) -> str:
    if _cached(summary):
        return "all from this host's cache"
    return (
        f"{summary['bytes_origin'] / 2**20:.1f} MiB from the origin,"
        f" {summary['bytes_p2p'] / 2**20:.1f} MiB from peers"
    )


def _saved_all(summary: Mapping[str, Any]) -> str:
    """What a recursive get did, in one line for the terminal."""
    size, seconds = summary["content_length"], summary["seconds"]
    return (
        f"{summary['output']}: {summary['written']} files, {size / 2**20:.1f} MiB in"
        f" {seconds:.1f}s ({_sources(summary)})"
    )


def _saved(summary: Mapping[str, Any]) -> str:
    """What a get did, in one line for the terminal (no rate for a copy already here)."""
    size, seconds = summary["content_length"], summary["seconds"]
    rate = "" if _cached(summary) else f"{size / 2**20 / max(seconds, 1e-6):.1f} MiB/s; "
    return (
        f"{summary['output']}: {size / 2**20:.1f} MiB in {seconds:.1f}s ({rate}{_sources(summary)})"
    )


def _when(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix or 0))


def _fail(exc: SwarmflyError, *, as_json: bool, result: Mapping[str, Any] | None = None) -> int:
    """Report a failure: one line on stderr with the cause in words; with --json also the
    one JSON document on stdout (the error, and ``result``: what was done); the exit status
    of its code."""
    print(f"swarmfly: {' '.join(exc.message.split())}", file=sys.stderr, flush=True)
    if as_json:
        _print_json({"ok": False, **(result or {}), **exc.to_dict()})
    return exc.exit_status
