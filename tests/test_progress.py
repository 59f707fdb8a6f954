"""The progress bar (engine.executor.progress_bar): decimal units like the summary, and a usable
width when the terminal reports 0 columns (a serial console, some CI pseudo-terminals)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios
import time

from relex_kernels.engine.executor import progress_bar


def _render_on_pty(monkeypatch, cols: int, total: int, done: int) -> str:
    """Draw a bar on a pseudo-terminal of ``cols`` columns; what the terminal received."""
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
        with open(slave, "w", buffering=1, closefd=False) as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            bar = progress_bar(total, True)
            bar.update(done)
            bar.refresh()
            bar.close()
            tty.flush()
        time.sleep(0.05)
        os.set_blocking(master, False)
        out = b""
        try:
            while chunk := os.read(master, 1 << 16):
                out += chunk
        except BlockingIOError:
            pass
        return out.decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)


def _last_line(text: str) -> str:
    return [s for s in text.replace("\n", "\r").split("\r") if s.strip()][-1]


def test_zero_columns_terminal_gets_a_fixed_width_bar(monkeypatch):
    monkeypatch.setenv("COLUMNS", "0")
    out = _render_on_pty(monkeypatch, 0, 5_000_000_000, 1_234_567_890)
    line = _last_line(out)
    assert "1.23G/5.00G" in line, repr(out)  # the counts, in decimal GB
    assert 60 <= len(line) <= 80, repr(line)  # a bar of a sensible fixed width
    assert "|" in line


def test_units_are_decimal_like_the_summary(monkeypatch):
    out = _render_on_pty(monkeypatch, 100, 3_000_000, 1_500_000)
    line = _last_line(out)
    assert "1.50M/3.00M" in line, repr(out)  # MB of 10^6 bytes, not MiB (1.43M/2.86M)
    assert len(line) <= 100
