"""The package's front door: what `import vhusniff` gives, and what it costs."""
from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_vhost_user_layer_is_importable_from_the_package_and_loads_scapy_only_then():
    done = run_python(
        "import sys, struct, vhusniff\n"
        "assert 'scapy' not in sys.modules and 'vhusniff.layers.packets' not in sys.modules, 'stays cheap'\n"
        "assert 'VhostUser' in dir(vhusniff)\n"
        "from vhusniff import VhostUser, VhostUserBackend, VhostUserGpu\n"
        "assert 'scapy' in sys.modules\n"
        "import vhusniff.layers.packets\n"
        "from vhusniff.layers import packets\n"
        "assert VhostUser is packets.VhostUser and VhostUserGpu is packets.VhostUserGpu\n"
        "raw = struct.pack('<IIIQ', 2, 1, 8, 1 << 32)\n"
        "assert bytes(VhostUser(raw)) == raw and VhostUser(raw).payload.features == 1 << 32\n"
        "print('ok')\n")
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


def test_an_unknown_name_is_still_an_attribute_error():
    done = run_python("import sys, vhusniff\n"
                      "try:\n    vhusniff.NoSuchThing\nexcept AttributeError as error:\n    print(error)\n"
                      "try:\n    from vhusniff import NoSuchLayer\nexcept ImportError:\n    print('import error')\n"
                      "assert 'scapy' not in sys.modules\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "module 'vhusniff' has no attribute 'NoSuchThing'\nimport error\n"
