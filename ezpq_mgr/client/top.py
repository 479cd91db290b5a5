"""``ezpq top``: a live view of a server, redrawn in place until ``q``.

Each refresh is one ``top`` call (the server samples its running jobs'
process trees then: CPU % and RSS now) drawn with rich's ``Live``; between
refreshes the command waits on its terminal for a key, so ``q`` quits at
once and nothing polls faster than the refresh. The terminal is put in
cbreak mode (keys without Enter; Ctrl-C still interrupts) and always
restored. A server that goes away ends it with the caller's one-line error
(``ConnectionError``), Ctrl-C with ``KeyboardInterrupt``: the ``ezpq``
command turns them into exit codes 3 and 130.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from typing import Callable, Iterator, Optional

from ..cli import _fmt_bytes as _bytes   # the CLI's tables and this view show sizes alike

__all__ = ["render", "run_top"]


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = int(s)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def render(view: dict, where: str):
    """The screen for one ``top`` answer: a heading line, the running jobs,
    the waiting counts per user and queue (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text.assemble(
        ("ezpq top ", "bold"), f"{where}  ",
        f"workers {view['busy']}/{view['workers']} busy  ",
        f"waiting {view['waiting_total']}  ",
        (time.strftime("%H:%M:%S"), "dim"), ("   q: quit", "dim"))
    running = Table(title="running", title_justify="left", expand=False, box=None, header_style="bold")
    for name, justify in (("job", "right"), ("qid", "left"), ("id", "right"), ("user", "left"),
                          ("name", "left"), ("cpu%", "right"), ("rss", "right"), ("runtime", "right"),
                          ("pid", "right")):
        running.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis",
                           max_width=24 if justify == "left" else None)
    for j in view["running"]:
        cpu = "-" if j["cpu_percent"] is None else f"{j['cpu_percent']:.0f}%"
        running.add_row(str(j["job"]), j["qid"], str(j["id"]), j["user"], str(j["name"]), cpu,
                        _bytes(j["rss"]), _duration(j["runtime"]), str(j["pid"] or "-"))
    if not view["running"]:
        running.add_row("-", "(nothing runs)", *[""] * 7)
    queues = Table(title="queues", title_justify="left", expand=False, box=None, header_style="bold")
    for name, justify in (("user", "left"), ("qid", "left"), ("waiting", "right"), ("running", "right"),
                          ("paused", "left")):
        queues.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis",
                          max_width=24 if justify == "left" else None)
    for q in view["queues"]:
        queues.add_row(q["user"], q["qid"], str(q["waiting"]), str(q["running"]), "paused" if q["paused"] else "")
    return Group(head, Text(""), running, Text(""), queues)


@contextlib.contextmanager
def _keys() -> Iterator[Optional[int]]:
    """The terminal's fd in cbreak mode (keys one by one, no echo; Ctrl-C
    still a SIGINT), restored on the way out; None when stdin is no terminal."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    import termios
    import tty
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_within(fd: Optional[int], seconds: float) -> bool:
    """Wait up to ``seconds`` for a key; True for ``q`` (or ``Q``)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 1)
            if key in (b"q", b"Q"):
                return True
            if not key:   # the terminal is gone
                return True


def run_top(fetch: Callable[[], dict], where: str, interval: float = 1.0) -> int:
    """Redraw ``fetch()`` every ``interval`` seconds until ``q``; 0."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with _keys() as fd:
        with Live(render(fetch(), where), console=console, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            live.refresh()
            while not _quit_within(fd, interval):
                live.update(render(fetch(), where), refresh=True)
    return 0
