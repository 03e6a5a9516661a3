"""The deployment README documents: Debian's nginx, run on the rendered
gateway/deploy/nginx.conf.template, in front of two real gateways.

Every part is a real subprocess on free loopback ports.  Clients reach nginx
from other loopback addresses (127.0.0.2, 127.0.0.3), so the address nginx
saw differs from the gateways' peer (nginx, 127.0.0.1) and a label shows
which one the room believed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from browser_helpers import (
    GatewayProcess,
    expect_,
    join,
    message_entry,
    notice_entry,
    room_entries,
    say,
)
from conftest import Program
from prometheus_client.parser import text_string_to_metric_families

from gateway import deploy

# start_redis; the browser and pages fixtures.
pytest_plugins = ["redis_fixtures", "browser_fixtures"]

NGINX_TIMEOUT = 10.0


def require_nginx() -> None:
    """Skip without nginx, except under CI=true where the tests must run."""
    try:
        deploy.nginx_binary()
    except FileNotFoundError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"deployment tests must run under CI: {exc}")
        pytest.skip(str(exc))


class NginxProcess:
    """nginx on a config rendered by ``deploy.render_nginx`` in ``prefix``."""

    def __init__(self, prefix: Path, gateways: list[str]) -> None:
        self.port = deploy.free_port()
        self.prefix = prefix
        self.conf = deploy.render_nginx(prefix, f"127.0.0.1:{self.port}", gateways)
        self._out = open(prefix / "stdout.log", "wb")
        self.proc = subprocess.Popen(deploy.nginx_argv(self.conf), stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT)
        if not deploy.wait_nginx(self.conf, self.proc.pid, NGINX_TIMEOUT,
                                 lambda: self.proc.poll() is None):
            self.stop()
            raise RuntimeError(f"nginx did not start:\n{self.error_log()}")
        self.url = f"http://127.0.0.1:{self.port}/"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        return (self.prefix / "access.log").read_text(errors="replace")

    def stop(self) -> None:
        """Graceful stop (SIGQUIT) by PID; SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(NGINX_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


@pytest.fixture
def start_nginx(tmp_path):
    """Factory ``start_nginx(gateway_addresses) -> NginxProcess``."""
    require_nginx()
    started: list[NginxProcess] = []

    def start(gateways: list[str]) -> NginxProcess:
        prefix = tmp_path / f"nginx-{len(started)}"
        prefix.mkdir()
        nginx = NginxProcess(prefix, gateways)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


@pytest.fixture
def trusting_gateway(tmp_path):
    """Factory ``trusting_gateway(chat_port) -> GatewayProcess`` that
    believes nginx's X-Forwarded-For (``--trusted-proxy 127.0.0.1/32``)."""
    started: list[GatewayProcess] = []

    def start(chat_port: int) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path, chat_port, 0, "--trusted-proxy=127.0.0.1/32")
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.kill()


def gateway_sessions(gateway: GatewayProcess) -> float:
    """``gateway_sessions`` from the gateway's own /metrics (not via nginx)."""
    with urllib.request.urlopen(f"{gateway.url}metrics", timeout=5) as reply:
        text = reply.read().decode()
    return next(s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "gateway_sessions")


class WsMember:
    """A WebSocket client of the page's protocol, from a chosen local address."""

    def __init__(self, session: aiohttp.ClientSession, ws) -> None:
        self.session = session
        self.ws = ws
        self.label = ""

    @classmethod
    async def join(cls, url: str, name: str, source: str,
                   forged_for: str | None = None) -> WsMember:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        session = aiohttp.ClientSession(connector=connector)
        headers = {"Origin": url.rstrip("/")}
        if forged_for:
            headers["X-Forwarded-For"] = forged_for
        try:
            async with asyncio.timeout(10):
                ws = await session.ws_connect(f"{url}ws", headers=headers)
            member = cls(session, ws)
            await member.send({"type": "hello", "name": name})
            welcome = await member.until(lambda m: m["type"] == "welcome")
        except BaseException:
            await session.close()
            raise
        member.label = welcome["label"]
        return member

    async def send(self, message: dict) -> None:
        await self.ws.send_str(json.dumps(message))

    async def until(self, predicate, timeout: float = 10.0) -> dict:
        """Read payloads (one per line of a WebSocket message) until one
        matches; TimeoutError if none does in time."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.ws.receive()
                assert message.type == aiohttp.WSMsgType.TEXT, message
                for line in message.data.split("\n"):
                    payload = json.loads(line)
                    if predicate(payload):
                        return payload

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


def test_nginx_balances_websockets_over_both_gateways(start_server, trusting_gateway,
                                                      start_nginx):
    server = start_server("--max-per-ip=200")
    gateways = [trusting_gateway(server.port), trusting_gateway(server.port)]
    nginx = start_nginx([f"127.0.0.1:{g.port}" for g in gateways])

    with urllib.request.urlopen(nginx.url, timeout=5) as reply:
        assert reply.status == 200
        assert "<html" in reply.read().decode().lower()

    async def chat() -> tuple[str, str, str]:
        # least_conn: the second session goes to the gateway with none.
        alice = await WsMember.join(nginx.url, "alice", "127.0.0.2")
        bob = await WsMember.join(nginx.url, "bob", "127.0.0.3", forged_for="203.0.113.9")
        try:
            sessions = [gateway_sessions(g) for g in gateways]
            await alice.send({"type": "say", "text": "through nginx"})
            heard = await bob.until(lambda m: m.get("text") == "through nginx")
            assert heard["from"] == alice.label
            return alice.label, bob.label, sessions
        finally:
            await alice.close()
            await bob.close()

    alice, bob, sessions = asyncio.run(chat())
    assert sessions == [1, 1], "each gateway should carry one of the two sessions"
    # Labelled with the address nginx saw, not nginx's own (127.0.0.1) and
    # not what a client wrote into X-Forwarded-For itself.
    assert alice == "alice@127.0.0.2"
    assert bob == "bob@127.0.0.3"
    nginx.stop()  # a WebSocket's access line is written when it ends: wait for all
    upgrades = [line for line in nginx.access_log().splitlines() if '"GET /ws ' in line]
    assert len(upgrades) == 2 and all('" 101 ' in line for line in upgrades), upgrades


def test_rendered_config_passes_nginx_own_check(tmp_path):
    require_nginx()
    conf = deploy.render_nginx(tmp_path, "127.0.0.1:1", ["127.0.0.1:2", "127.0.0.1:3"])
    result = subprocess.run([*deploy.nginx_argv(conf), "-t"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_render_refuses_no_gateways(tmp_path):
    with pytest.raises(ValueError):
        deploy.render_nginx(tmp_path, "127.0.0.1:1", [])


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped yet counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_demo_runs_one_room_over_two_nodes_and_ctrl_c_stops_every_part(tmp_path, open_client):
    require_nginx()
    demo = Program(tmp_path, "-m", "gateway.demo", "--port=0", f"--state={tmp_path / 'state'}")
    try:
        url = demo.wait_log(r"chat room ready: open (http://\S+/) in a browser",
                            timeout=60).group(1)
        log = demo.log_text()
        pids = {name: int(pid) for name, pid in re.findall(r"(\S+) started as pid (\d+)", log)}
        assert sorted(pids) == ["gateway-1", "gateway-2", "nginx", "redis", "server-a",
                                "server-b"]
        ports = dict(re.findall(r"(server-[ab]): chat port (\d+)", log))
        ann = open_client(int(ports["server-a"]), "ann")
        ben = open_client(int(ports["server-b"]), "ben")

        async def through_nginx() -> str:
            cleo = await WsMember.join(url, "cleo", "127.0.0.2")
            try:
                await cleo.send({"type": "say", "text": "hello both nodes"})
                await cleo.until(lambda m: m.get("text") == "hello both nodes")
                return cleo.label
            finally:
                await cleo.close()

        cleo = asyncio.run(through_nginx())
        assert cleo == "cleo@127.0.0.2"
        for member in (ann, ben):  # one on each server, whichever gateway cleo used
            heard = member.recv_until(lambda m: m.get("text") == "hello both nodes")[0]
            assert heard["from"] == cleo
        ann.send({"type": "say", "text": "from node A"})
        assert ben.recv_until(lambda m: m.get("text") == "from node A")[0]["from"] \
            == ann.label

        assert demo.signal(signal.SIGINT, timeout=60) == 0
        assert all(_gone(pid) for pid in pids.values()), demo.log_text()
        assert (tmp_path / "state" / "redis" / "appendonlydir").is_dir()  # persistence on
    finally:
        demo.kill()


@pytest.mark.browser
def test_pages_on_both_gateways_and_terminals_on_both_servers_chat_in_one_room(
        start_redis, start_server, trusting_gateway, start_nginx, pages, piped):
    expect = expect_()
    redis = start_redis(persist=True)
    node_a, node_b = (start_server("--max-per-ip=200", f"--redis={redis.url}", "--room=deploy")
                      for _ in range(2))
    gateway_1, gateway_2 = trusting_gateway(node_a.port), trusting_gateway(node_b.port)
    nginx = start_nginx([f"127.0.0.1:{g.port}" for g in (gateway_1, gateway_2)])

    alice = pages.open(nginx.url)
    join(alice, "alice")
    bob = pages.open(nginx.url)
    join(bob, "bob")
    # least_conn put bob's WebSocket on the gateway alice's is not on.
    assert [gateway_sessions(gateway_1), gateway_sessions(gateway_2)] == [1, 1]
    assert all(url.startswith(f"ws://127.0.0.1:{nginx.port}/") for url in pages.sockets)
    expect(notice_entry(alice, "join", "bob")).to_have_count(1)

    carol = piped(node_a.port, "carol")
    carol.expect(r"^\* joined as carol@")
    dave = piped(node_b.port, "dave")
    dave.expect(r"^\* joined as dave@")
    for page in (alice, bob):
        expect(notice_entry(page, "join", "carol")).to_have_count(1)
        expect(notice_entry(page, "join", "dave")).to_have_count(1)
    carol.expect(r"\* dave@\S+ joined$")

    said = {"carol": "hello from server A's terminal", "dave": "and from server B's",
            "alice": "hello from page 1", "bob": "and page 2"}
    carol.type(said["carol"])
    dave.type(said["dave"])
    say(alice, said["alice"])
    say(bob, said["bob"])
    for page in (alice, bob):
        for sender, text in said.items():
            expect(message_entry(page, sender, text)).to_have_count(1)
    for terminal in (carol, dave):
        for sender, text in said.items():
            terminal.expect(rf"\] {sender}@\S+: {re.escape(text)}$")

    # One transcript, one order, own messages included, on every node.
    def terminal_order(terminal) -> list[str]:
        return [line.split(": ", 1)[1] for line in terminal.lines["out"]
                if re.search(r"\] \w+@\S+: ", line)]

    orders = [terminal_order(carol), terminal_order(dave)]
    for page in (alice, bob):
        entries = [e for e in room_entries(page) if e["kind"] == "message"]
        orders.append([e["text"] for e in entries])
        seqs = [e["seq"] for e in entries]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(order == orders[0] for order in orders), orders
    assert sorted(orders[0]) == sorted(said.values())
    assert pages.problems == []


def test_demo_stops_every_part_when_one_dies_or_when_it_is_killed(tmp_path):
    require_nginx()

    def start() -> tuple[Program, dict[str, int]]:
        demo = Program(tmp_path, "-m", "gateway.demo", "--port=0",
                       f"--state={tmp_path / 'state'}")
        demo.wait_log(r"chat room ready", timeout=60)
        return demo, {name: int(pid) for name, pid in
                      re.findall(r"(\S+) started as pid (\d+)", demo.log_text())}

    demo, pids = start()
    try:
        os.kill(pids["server-b"], signal.SIGKILL)
        assert demo.proc.wait(60) == 1
        demo.wait_log(r"server-b died \(exit code -9\)")
        assert all(_gone(pid) for pid in pids.values()), demo.log_text()
    finally:
        demo.kill()

    # kill -9 of the demo itself: the parts are told by the kernel.
    demo, pids = start()
    try:
        demo.proc.kill()
        demo.proc.wait(10)
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in pids.values())
    finally:
        for pid in pids.values():  # only the demo's own parts, by PID
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        demo.kill()


def test_demo_with_its_port_taken_says_so_and_starts_nothing_else(tmp_path):
    require_nginx()
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        demo = Program(tmp_path, "-m", "gateway.demo", f"--port={port}",
                       f"--state={tmp_path / 'state'}")
        try:
            assert demo.proc.wait(60) == 1
        finally:
            demo.kill()
    finally:
        taken.close()
    log = demo.log_text()
    assert f"port {port} is busy (choose another with --port)" in log
    assert "chat room ready" not in log
    assert "started as pid" not in log
