"""The gateway as a program: ``python -m gateway``, the ``chatroom`` launcher
(server plus gateway), and a plain ``pip install`` finding the page."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, Program, RawClient

SERVING = re.compile(r"serving on http://(\S+?):(\d+)/")
LISTENING = re.compile(r"listening on (\S+):(\d+)")



@pytest.fixture
def program(tmp_path):
    started = []

    def start(*args: str, **popen) -> Program:
        started.append(Program(tmp_path, *args, **popen))
        return started[-1]

    yield start
    for prog in started:
        prog.kill()


@pytest.fixture
def busy_port():
    """A port with a listener on it, so binding it fails."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# --- python -m gateway -----------------------------------------------------

def test_gateway_command_serves_and_sigterm_closes_sessions_1001(program, server, request):
    gw = program("-m", "gateway", "--http-port=0", f"--chat-port={server.port}")
    host, port = gw.wait_log(SERVING).groups()
    alice = RawClient(server.port)
    request.addfinalizer(alice.close)
    alice.join("alice")

    async def session() -> aiohttp.WSMessage:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"http://{host}:{port}/ws") as ws:
                await ws.send_json({"type": "hello", "name": "web"})
                assert json.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
                gw.proc.send_signal(signal.SIGTERM)
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        return msg

    msg = asyncio.run(session())
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.GOING_AWAY)
    assert gw.proc.wait(10) == 0
    left, _ = alice.recv_until(lambda m: m["type"] == "leave")
    assert left["member"] == "web@127.0.0.1"
    assert "stopped" in gw.log_text()


def test_gateway_command_busy_http_port(program, server, busy_port):
    gw = program("-m", "gateway", f"--http-port={busy_port}", f"--chat-port={server.port}")
    assert gw.proc.wait(10) == 1
    assert f"HTTP port {busy_port} is busy" in gw.log_text()
    assert "Traceback" not in gw.log_text()


def test_gateway_command_rejects_bad_options(program):
    gw = program("-m", "gateway", "--trusted-proxy=10.0.0.0/99")
    assert gw.proc.wait(10) == 2
    assert "10.0.0.0/99" in gw.log_text() and "Traceback" not in gw.log_text()


# --- chatroom: server and gateway together ------------------------------------

def test_chatroom_bare_command_runs_both_and_sigterm_stops_both(program):
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0")
    chat_port = int(room.wait_log(LISTENING).group(2))
    host, http_port = room.wait_log(SERVING).groups()
    assert re.search(rf"open http://{re.escape(host)}:{http_port}/ in a browser", room.log_text())

    status, body = get(f"http://{host}:{http_port}/health")
    assert status == 200
    health = json.loads(body)
    assert health["chat_server"]["address"] == f"127.0.0.1:{chat_port}"
    assert get(f"http://{host}:{http_port}/")[0] == 200

    assert room.signal(signal.SIGTERM) == 0, room.log_text()
    assert refused(chat_port) and refused(int(http_port))
    assert "tcpserver.server INFO stopped" in room.log_text()


def test_chatroom_ctrl_c_stops_both(program):
    # A terminal's Ctrl-C reaches the whole process group: launcher and server.
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0", start_new_session=True)
    chat_port = int(room.wait_log(LISTENING).group(2))
    room.wait_log(SERVING)
    os.killpg(room.proc.pid, signal.SIGINT)
    assert room.proc.wait(20) == 0, room.log_text()
    assert refused(chat_port)
    assert "Traceback" not in room.log_text()


def test_chatroom_killed_outright_takes_its_server_with_it(program):
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0")
    chat_port = int(room.wait_log(LISTENING).group(2))
    room.wait_log(SERVING)
    assert not refused(chat_port)
    room.proc.kill()  # SIGKILL: the launcher gets no chance to stop the server
    room.proc.wait(5)
    deadline = time.monotonic() + 10
    while not refused(chat_port):
        assert time.monotonic() < deadline, "the server outlived its launcher"
        time.sleep(0.1)


def test_chatroom_passes_server_options_through(program):
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0", "--max-frame=2000",
                   "--log-level=debug")
    room.wait_log(SERVING)
    assert "--max-frame=2000" not in room.log_text()  # not an error about the option
    host, http_port = room.wait_log(SERVING).groups()

    async def oversized() -> aiohttp.WSMessage:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"http://{host}:{http_port}/ws") as ws:
                await ws.send_str(json.dumps({"type": "say", "text": "x" * 2000}))
                return await ws.receive(timeout=5)

    # The gateway took the server's frame limit as its message limit.
    msg = asyncio.run(oversized())
    assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, aiohttp.WSCloseCode.MESSAGE_TOO_BIG)
    assert room.signal(signal.SIGTERM) == 0


def test_chatroom_busy_chat_port(program, busy_port):
    room = program("-m", "gateway.cli", f"--port={busy_port}", "--http-port=0")
    assert room.proc.wait(15) != 0
    assert f"chat port {busy_port} is busy" in room.log_text()
    assert "serving on" not in room.log_text() and "Traceback" not in room.log_text()


def test_chatroom_busy_http_port_stops_the_server(program, busy_port):
    room = program("-m", "gateway.cli", "--port=0", f"--http-port={busy_port}")
    assert room.proc.wait(15) != 0
    chat_port = int(room.wait_log(LISTENING).group(2))
    assert f"HTTP port {busy_port} is busy" in room.log_text()
    assert refused(chat_port)
    assert "tcpserver.server INFO stopped" in room.log_text()
    assert "Traceback" not in room.log_text()


# --- packaging -----------------------------------------------------------------

def test_plain_install_finds_templates_and_static(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-compile", "--quiet", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=100)
    assert build.returncode == 0, build.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import json, gateway, gateway.app as a\n"
        "t, s = a.asset_dirs()\n"
        "a.create_app()\n"
        "print(json.dumps({'package': gateway.__file__, 'templates': str(t),"
        " 'static': str(s), 'version': gateway.__version__}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    package = Path(found["package"]).parent
    assert package == target / "gateway"  # the installed copy, not the checkout
    assert Path(found["templates"]) == package / "templates"
    assert Path(found["static"]) == package / "static"
    assert (package / "templates" / "index.html").is_file()
    assert (package / "static" / "chat.js").is_file()
    assert found["version"] != "0+unknown"
