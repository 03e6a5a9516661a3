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

from gateway.launcher import RestartPolicy

SERVING = re.compile(r"serving on http://(\S+?):(\d+)/")
LISTENING = re.compile(r"listening on (\S+):(\d+)")
STARTED = re.compile(r"the chat server started as pid (\d+)")



@pytest.fixture
def program(tmp_path):
    started = []

    def start(*args: str, **popen) -> Program:
        # Per-user state (the room's database) goes under this test's own
        # directory, never the real user's, and no two tests share it.
        popen.setdefault("env", {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
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
                first = (await ws.receive(timeout=5)).data.split("\n")[0]  # may be a batch
                assert json.loads(first)["type"] == "welcome"
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


# --- chatroom: the room stays up ----------------------------------------------

def test_restart_delay_doubles_to_a_ceiling():
    policy = RestartPolicy()
    # Deaths a minute apart never make a crash loop.
    delays = [policy.died(at=i * 60.0, uptime=1.0) for i in range(10)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]


def test_restart_delay_starts_again_after_a_stable_run():
    policy = RestartPolicy()
    assert [policy.died(at, uptime=1.0) for at in (0.0, 10.0, 20.0)] == [0.5, 1, 2]
    assert policy.died(200.0, uptime=60.0) == 0.5
    assert policy.died(210.0, uptime=1.0) == 1


def test_five_deaths_within_a_minute_is_a_crash_loop():
    policy = RestartPolicy()
    assert [policy.died(at, uptime=0.0) for at in (0.0, 1.0, 2.0, 3.0)] == [0.5, 1, 2, 4]
    assert policy.died(59.9, uptime=0.0) is None


def test_deaths_spread_wider_than_the_window_are_restarted():
    policy = RestartPolicy()
    # One every 15 s: at most four in any 60 s.
    assert all(policy.died(i * 15.0, uptime=14.0) is not None for i in range(40))


def wait_until(predicate, what: str, timeout: float = 30.0):
    """Poll ``predicate`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def server_pids(room: Program) -> list[int]:
    return [int(pid) for pid in STARTED.findall(room.log_text())]


def hold_port(port: int) -> socket.socket:
    """Listen on ``port`` as soon as it is free (its old owner just died)."""
    def attempt():
        try:
            return socket.create_server(("127.0.0.1", port))
        except OSError:
            return None
    return wait_until(attempt, f"free port {port}", timeout=10)


async def chat(url: str, name: str, text: str) -> dict:
    """Join through the gateway, say ``text``; return the room's echo of it."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}ws") as ws:
            await ws.send_json({"type": "hello", "name": name})
            await ws.send_json({"type": "say", "text": text})
            while True:
                msg = await ws.receive(timeout=10)
                assert msg.type is aiohttp.WSMsgType.TEXT, msg
                for line in msg.data.split("\n"):  # several payloads per message
                    event = json.loads(line)
                    assert event["type"] != "error", event
                    if event["type"] == "message" and event["text"] == text:
                        return event


def test_chatroom_restarts_a_killed_server_on_its_port(program):
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0")
    chat_port = int(room.wait_log(LISTENING).group(2))
    host, http_port = room.wait_log(SERVING).groups()
    url = f"http://{host}:{http_port}/"
    assert get(f"{url}health")[0] == 200
    assert asyncio.run(chat(url, "early", "before"))["text"] == "before"
    [first] = server_pids(room)

    # The launcher is held still while the test takes the freed port, so
    # that the first restarts fail for certain and /health is seen down.
    room.proc.send_signal(signal.SIGSTOP)
    try:
        os.kill(first, signal.SIGKILL)
        holder = hold_port(chat_port)
    finally:
        room.proc.send_signal(signal.SIGCONT)
    with holder:
        room.wait_log(rf"did not restart \(chat port {chat_port} is busy\)")
        status, body = get(f"{url}health")
        assert status == 503, body
        assert json.loads(body)["chat_server"]["reachable"] is False
    assert "the chat server died (killed by SIGKILL); restarting it in 0.5 s" in room.log_text()

    room.wait_log(rf"the chat server is back on port {chat_port}")
    wait_until(lambda: get(f"{url}health")[0] == 200, "200 from /health")
    assert asyncio.run(chat(url, "later", "after"))["text"] == "after"
    assert len(server_pids(room)) >= 3 and first not in server_pids(room)[1:]
    assert room.proc.poll() is None  # the gateway kept serving throughout

    assert room.signal(signal.SIGTERM) == 0, room.log_text()
    assert refused(chat_port) and refused(int(http_port))
    assert "Traceback" not in room.log_text()


def test_chatroom_crash_loop_gives_up_in_one_line(program):
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0")
    chat_port = int(room.wait_log(LISTENING).group(2))
    http_port = int(room.wait_log(SERVING).group(2))
    for n in range(1, 6):
        pids = wait_until(lambda: len(server_pids(room)) >= n and server_pids(room),
                          f"server number {n}")
        os.kill(pids[n - 1], signal.SIGKILL)
    assert room.proc.wait(30) == 1, room.log_text()
    errors = [line for line in room.log_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert errors[0].endswith("the chat server died 5 times within 60 s "
                              "(last: killed by SIGKILL); giving up")
    assert len(server_pids(room)) == 5
    assert refused(chat_port) and refused(http_port)
    assert "Traceback" not in room.log_text()


def test_chatroom_sigterm_while_the_server_is_down_exits_0(program):
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0")
    chat_port = int(room.wait_log(LISTENING).group(2))
    http_port = int(room.wait_log(SERVING).group(2))
    [first] = server_pids(room)
    room.proc.send_signal(signal.SIGSTOP)
    os.kill(first, signal.SIGKILL)
    room.proc.send_signal(signal.SIGTERM)  # pending until it runs again
    room.proc.send_signal(signal.SIGCONT)
    assert room.proc.wait(20) == 0, room.log_text()
    assert refused(chat_port) and refused(http_port)
    assert "Traceback" not in room.log_text()


def test_chatroom_follows_a_server_stopped_on_purpose(program):
    room = program("-m", "gateway.cli", "--port=0", "--http-port=0")
    room.wait_log(SERVING)
    [first] = server_pids(room)
    os.kill(first, signal.SIGTERM)  # an orderly stop: exit 0, not a crash
    assert room.proc.wait(20) == 0, room.log_text()
    assert "the chat server stopped; stopping the gateway" in room.log_text()
    assert len(server_pids(room)) == 1


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
