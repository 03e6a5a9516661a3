"""House rules that a reviewer would otherwise have to remember."""

import re
import subprocess
import sys

from conftest import ROOT


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "tcpserver", "gateway",
                             "tests"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_the_protocol_module_touches_frame_headers():
    # One codec: nobody else packs or unpacks the 4-byte length.
    offenders = []
    for path in [*ROOT.glob("tcpserver/*.py"), *ROOT.glob("gateway/*.py")]:
        if path.name == "protocol.py":
            continue
        if re.search(r"struct\.|int\.from_bytes|\.to_bytes\(", path.read_text()):
            offenders.append(path.name)
    assert offenders == []


def test_no_print_in_server_or_gateway():
    # The terminal client's user interface (display.py) is the one exception.
    pattern = re.compile(r"^\s*print\(", re.M)
    paths = [*ROOT.glob("gateway/*.py"), ROOT / "tcpserver" / "rules.py",
             *(ROOT / "tcpserver" / f"{name}.py"
               for name in ("server", "inbound", "outbound", "listener", "pacing"))]
    assert [p.name for p in paths if pattern.search(p.read_text())] == []
