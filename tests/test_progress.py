"""The progress bar on stderr while a capture is read: drawn on a terminal, never in stdout, absent otherwise."""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTURE = os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng")
CAPTURE_SIZE_TEXT = "4.52k"          # the shipped capture's size as the bar shows it (KiB)


def run(command: list[str], stderr_tty: bool, stdin=None) -> tuple[int, bytes, bytes]:
    """Run `vhusniff COMMAND`: stdout a pipe; stderr a pseudo-terminal (80 columns) or a pipe."""
    argv = [sys.executable, "-m", "vhusniff", *command]
    if not stderr_tty:
        result = subprocess.run(argv, stdin=stdin, capture_output=True, timeout=60, cwd=ROOT)
        return result.returncode, result.stdout, result.stderr
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    finally:
        os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:                 # EIO: the last writer of the terminal is gone
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    stdout = process.stdout.read()
    process.stdout.close()
    return process.wait(timeout=60), stdout, drawn


def bar_lines(drawn: bytes) -> list[str]:
    """The bar's drawings: text between carriage returns that holds a bar (`NN%|` or a byte counter)."""
    return [part for part in drawn.decode(errors="replace").split("\r") if "%|" in part or "B [" in part]


COMMANDS = [
    ["read", CAPTURE],
    ["read", "-V", "-x", CAPTURE],                       # the general path
    ["read", "-T", "json", CAPTURE],
    ["read", "--expert", CAPTURE],
    ["stats", CAPTURE],
    ["expert", CAPTURE],
    ["report", CAPTURE],
    ["state", CAPTURE],
    ["diff", CAPTURE, CAPTURE],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:-1]).replace(CAPTURE, "A"))
def test_a_bar_is_drawn_on_a_terminal_and_stdout_is_unchanged(command):
    plain_rc, plain_out, plain_err = run(command, stderr_tty=False)
    assert plain_err == b""                               # not a terminal: no progress output at all
    rc, out, drawn = run(command, stderr_tty=True)
    assert (rc, out) == (plain_rc, plain_out)
    bars = bar_lines(drawn)
    assert bars and all("qemu-blk-boot.pcapng" in bar for bar in bars), drawn
    assert any(CAPTURE_SIZE_TEXT in bar for bar in bars), drawn
    # Wiped at the end: the last drawing is blanks, the cursor back at the start of the line.
    assert drawn.endswith(b"\r") and drawn.rsplit(b"\r", 2)[-2].strip() == b"", drawn


def test_timeline_draws_a_bar_and_writes_its_file(tmp_path):
    output = tmp_path / "t.svg"
    rc, out, drawn = run(["timeline", CAPTURE, "-o", str(output)], stderr_tty=True)
    assert rc == 0 and out.startswith(str(output).encode()) and output.read_text().startswith("<svg")
    assert bar_lines(drawn)


@pytest.mark.parametrize("command", [["read", "-q", CAPTURE], ["stats", "--quiet", CAPTURE],
                                     ["diff", "-q", CAPTURE, CAPTURE]])
def test_quiet_draws_nothing(command):
    rc, out, drawn = run(command, stderr_tty=True)
    assert rc == 0 and out and drawn == b""


def test_a_pipe_has_no_size_and_the_bar_counts_bytes():
    reader, writer = os.pipe()
    with open(CAPTURE, "rb") as capture:
        data = capture.read()
    assert len(data) < 65536              # fits in the pipe: written whole before the reader starts
    os.write(writer, data)
    os.close(writer)
    try:
        rc, out, drawn = run(["read", "/dev/stdin"], stderr_tty=True, stdin=reader)
    finally:
        os.close(reader)
    assert rc == 0 and out.count(b"\n") > 10
    bars = bar_lines(drawn)
    assert bars and not any("%|" in bar for bar in bars), drawn        # a counter, no percentage


def test_damage_wipes_the_bar_before_the_error_line(tmp_path):
    damaged = tmp_path / "damaged.pcapng"
    with open(CAPTURE, "rb") as capture:
        damaged.write_bytes(capture.read()[:3000])
    rc, out, drawn = run(["stats", str(damaged)], stderr_tty=True)
    assert rc == 2 and b"Messages per channel" in out
    text = drawn.decode()
    assert bar_lines(text.encode())
    bar, _, error = text.partition("vhusniff: ")         # the terminal ends the error line with \r\n
    assert "offset" in error and "%|" not in error
    assert bar.endswith("\r") and bar.rsplit("\r", 2)[-2].strip() == "", text


def test_a_missing_file_draws_no_bar():
    rc, out, drawn = run(["read", "no-such-capture.pcapng"], stderr_tty=True)
    assert rc == 2 and out == b"" and not bar_lines(drawn) and b"No such file" in drawn


def test_the_bar_is_not_drawn_when_read_writes_to_the_terminal_itself():
    """`read` streams its lines to stdout: on the same terminal they are the progress, and a bar would cut
    through them."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        process = subprocess.Popen([sys.executable, "-m", "vhusniff", "read", "-c", "3", CAPTURE],
                                   stdout=slave, stderr=slave, cwd=ROOT)
    finally:
        os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert process.wait(timeout=60) == 0
    assert drawn.count(b"\n") == 3 and not bar_lines(drawn)


def test_without_a_terminal_the_capture_is_read_from_its_path_as_before():
    """Nothing is wrapped when no bar is drawn: the readers open the path themselves, at their own speed."""
    from vhusniff.capture.progress import capture_progress
    with capture_progress(CAPTURE) as progress:         # pytest's captured stderr is not a terminal
        assert progress.source() == CAPTURE and progress.bar is None
