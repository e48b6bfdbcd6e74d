"""The parts of the ``m3q`` command line that make a first day smooth: an unknown flag or command named with
the closest one, the install command for a missing extra, and a visible wait for a worker."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: an unknown flag is reported first, by this command, with the closest known one
    (argparse would report a missing required option instead, or the top-level usage)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        known = list(self._option_string_actions)
        for arg in args or ():
            if arg == "--":
                break
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and not any(option.startswith(flag) for option in known):
                self.error(f"unrecognized argument {flag}{did_you_mean(flag, known)}")
        return super().parse_known_args(args, namespace)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``": did you mean CLOSEST?"`` for the choice closest to a mistyped ``word``, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f": did you mean {close[0]}?" if close else ""


def check_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A mistyped command is named with the closest one (argparse lists them all)."""
    commands = list(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public walk
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        parser.error(f"unknown command {argv[0]!r}{did_you_mean(argv[0], commands) or ''} "
                     f"(the commands: {', '.join(commands)})")


def install_hint(extra: str) -> str:
    """The command that adds ``extra`` to this m3-queue: ``pip install -e '.[extra]'`` in a checkout (the package
    sits next to its pyproject.toml), else a pip requirement naming where this copy was installed from."""
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "m3-queue"' in pyproject.read_text(errors="replace"):
        return f"cd {shlex.quote(str(root))} && pip install -e '.[{extra}]'"
    source = _installed_from()
    return f"pip install 'm3-queue[{extra}] @ {source}'" if source else f"pip install 'm3-queue[{extra}]'"


def _installed_from() -> str | None:
    """The URL pip installed m3-queue from (PEP 610's direct_url.json: a folder, an archive, a VCS), or None
    for a package from an index."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        raw = distribution("m3-queue").read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    if not raw:
        return None
    origin = json.loads(raw)
    vcs = origin.get("vcs_info")
    if vcs:
        return f"{vcs['vcs']}+{origin['url']}" + (f"@{vcs['commit_id']}" if vcs.get("commit_id") else "")
    return origin.get("url")


NON_TTY_PROGRESS_S = 3.0
"""On a stderr that is no terminal, a wait for a worker is shown by a line this often (a terminal gets one line,
rewritten each second)."""


class _WaitProgress(logging.Handler):
    """Shows producer.liveness' progress records on stderr, as ``m3q COMMAND: waiting for a worker ...``."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self.tty = sys.stderr.isatty()
        self.shown_at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        waited = getattr(record, "m3q_wait", None)
        if waited is None:  # the wait is over: the next line (a result, or NoWorker's message) starts clean
            if self.tty and self.shown_at is not None:
                sys.stderr.write("\r\x1b[K")
            self.shown_at = None
        elif self.tty:
            sys.stderr.write(f"\rm3q {self.command}: {record.getMessage()}\x1b[K")
            self.shown_at = waited
        elif self.shown_at is None or waited - self.shown_at >= NON_TTY_PROGRESS_S:
            sys.stderr.write(f"m3q {self.command}: {record.getMessage()}\n")
            self.shown_at = waited
        sys.stderr.flush()


WAITING_COMMANDS = ("encode", "index", "search", "reindex")
"""Commands that show a wait for a worker on stderr. A service (`m3q serve`, `m3q demo`) logs instead: a line
rewritten in place would garble its log."""


def show_wait_progress(command: str) -> None:
    """Show the waits for a worker on stderr (producer.liveness' progress records), for a command that waits
    for one on its user's behalf; a library caller's progress logger stays silent."""
    if command not in WAITING_COMMANDS:
        return
    from producer.liveness import progress

    progress.addHandler(_WaitProgress(command))
    progress.setLevel(logging.INFO)
