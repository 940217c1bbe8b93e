"""The dissector as a Wireshark plugin: installed in a personal plugins folder, in Debian's real Wireshark GUI.

The README's picture is taken by the same code:

    python3 tests/test_wireshark_gui.py docs/wireshark-blk-boot.png

It runs Wireshark (wireshark-qt) on a private X server (Xvfb) with the plugin in a throwaway home's
~/.local/lib/wireshark/plugins, opens the shipped blk boot capture at its ADD_MEM_REG, opens the vhost-user tree
with xdotool (vhost-user expanded, its pseudo-header folded) and grabs the screen with ImageMagick's `import`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vhusniff.protocol import catalogue as cat  # noqa: E402
from vhusniff.views.lua import DISSECTOR_PATH, grammar_tables  # noqa: E402

BOOT_CAPTURE = os.path.join(ROOT, "captures", "qemu-blk-boot.pcapng")
SHOWN_PACKET = 24                     # ADD_MEM_REG: a memory region, an fd, a request linked to its reply
SCREEN = (1600, 1100)
# Where the GUI puts things at this screen size with Wireshark's default layout (packet list over details and
# bytes): a row of the packet list, and the details pane's second and third rows (vhost-user, its pseudo-header).
PACKET_ROW = (400, 290)
TREE_ROOT_ROW = (60, 613)
PSEUDO_HEADER_ROW = (100, 630)
GUI_PROGRAMS = ("wireshark", "Xvfb", "xdotool", "xwd", "import")
IN_CI = os.environ.get("CI", "").lower() == "true"


def plugin_home(directory: str, plugin: bool = True) -> str:
    """A home whose personal Lua plugins folder holds the dissector, as the README tells users to install it."""
    plugins = os.path.join(directory, ".local", "lib", "wireshark", "plugins")
    os.makedirs(plugins, exist_ok=True)
    if plugin:
        shutil.copy(DISSECTOR_PATH, plugins)
    runtime = os.path.join(directory, "runtime")
    os.makedirs(runtime, mode=0o700, exist_ok=True)
    return directory


def _environment(home: str, display: str = "") -> dict[str, str]:
    environment = dict(os.environ, HOME=home, XDG_RUNTIME_DIR=os.path.join(home, "runtime"),
                       XDG_CONFIG_HOME=os.path.join(home, ".config"))
    if display:
        environment["DISPLAY"] = display
    return environment


def _screen_digest(display: str, home: str) -> bytes:
    grab = subprocess.run(["xwd", "-root", "-silent"], capture_output=True, env=_environment(home, display),
                          timeout=30)
    return hashlib.sha256(grab.stdout).digest()


def _until_drawn(display: str, home: str, timeout: float = 60.0) -> None:
    """Wait until the screen stops changing: two grabs in a row alike (Wireshark has drawn what it was asked)."""
    deadline = time.monotonic() + timeout
    last = _screen_digest(display, home)
    while time.monotonic() < deadline:
        now = _screen_digest(display, home)
        if now == last:
            return
        last = now
    raise TimeoutError(f"the screen on {display} kept changing for {timeout:.0f} s")


def _xdotool(display: str, home: str, *arguments: str) -> str:
    result = subprocess.run(["xdotool", *arguments], capture_output=True, text=True, env=_environment(home, display),
                            timeout=90)
    if result.returncode != 0:
        raise RuntimeError(f"xdotool {' '.join(arguments)}: {result.stderr.strip()}")
    return result.stdout


def screenshot(out: str, capture: str = BOOT_CAPTURE, packet: int = SHOWN_PACKET, plugin: bool = True) -> None:
    """Open `capture` in the Wireshark GUI with the plugin, show `packet`'s vhost-user tree, write a PNG to out.
    Without the plugin, only the packet list is shown."""
    with tempfile.TemporaryDirectory() as scratch:
        home = plugin_home(scratch, plugin)
        read_end, write_end = os.pipe()
        server = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0",
                                   f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"],
                                  pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(write_end)
        wireshark = None
        try:
            with os.fdopen(read_end) as numbers:
                display = ":" + numbers.readline().strip()      # Xvfb writes its number once it accepts clients
            wireshark = subprocess.Popen(["wireshark", "-r", capture, "-g", str(packet)],
                                         env=_environment(home, display), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            window = _xdotool(display, home, "search", "--sync", "--name", os.path.basename(capture)).split()[0]
            _xdotool(display, home, "windowsize", window, str(SCREEN[0]), str(SCREEN[1]),
                     "windowmove", window, "0", "0")
            _until_drawn(display, home)
            clicks = ((PACKET_ROW, ""), (TREE_ROOT_ROW, "shift+Right"), (PSEUDO_HEADER_ROW, "Left"))
            for (x, y), key in clicks if plugin else ():
                _xdotool(display, home, "mousemove", str(x), str(y), "click", "1")
                _until_drawn(display, home)
                if key:
                    _xdotool(display, home, "key", key)
                    _until_drawn(display, home)
            # 64 colours are plenty for a GUI's flat colours and keep the README's picture small
            subprocess.run(["import", "-window", "root", "-colors", "64", f"PNG8:{out}"],
                           env=_environment(home, display), check=True, timeout=60)
        finally:
            for process in (wireshark, server):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=30)


def _colours(path: str) -> int:
    result = subprocess.run(["identify", "-format", "%k", path], capture_output=True, text=True, check=True,
                            timeout=60)
    return int(result.stdout.strip())


needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None and not IN_CI, reason="tshark is not installed")
needs_gui = pytest.mark.skipif(any(shutil.which(program) is None for program in GUI_PROGRAMS) and not IN_CI,
                               reason="the Wireshark GUI, Xvfb, xdotool or ImageMagick is not installed")


@needs_tshark
def test_the_installed_plugin_registers_every_field_with_its_label(tmp_path):
    """What Wireshark loads from the personal plugins folder: each field by its dotted name, with its label."""
    result = subprocess.run(["tshark", "-G", "fields"], capture_output=True, text=True,
                            env=_environment(plugin_home(str(tmp_path))), timeout=120)
    assert result.returncode == 0, result.stderr
    registered = {}
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if parts[0] == "F" and parts[2].startswith("vhost_user."):
            registered[parts[2].removeprefix("vhost_user.")] = parts[1]
    tables = grammar_tables()
    expected = {name: cat.field_label(name)
                for table in ("FIELDS", "BYTE_FIELDS", "RECORD_FIELDS") for name in tables[table]}
    assert {name: label for name, label in registered.items() if name in expected} == expected
    assert registered["mem.region.guest_phys_addr"] == "Guest physical address"


@needs_gui
def test_wireshark_gui_opens_the_boot_capture_with_the_plugin(tmp_path):
    """The real GUI draws the capture with the plugin: the picture is not blank and differs from the same capture
    without the plugin (where the frames are undissected USER0 bytes)."""
    shot, bare = str(tmp_path / "wireshark.png"), str(tmp_path / "without-plugin.png")
    screenshot(shot)
    assert os.path.getsize(shot) > 20_000 and _colours(shot) > 16
    screenshot(bare, plugin=False)
    list_area = f"{SCREEN[0]}x400+0+90"       # the packet list: Protocol and Info columns
    differing = subprocess.run(["compare", "-metric", "AE", "-extract", list_area, shot, bare, "null:"],
                               capture_output=True, text=True, timeout=60)
    assert float(differing.stderr.split()[0]) > 10_000, differing.stderr


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    screenshot(sys.argv[1])
    print("wrote", sys.argv[1])
