"""``python -m gateway --workers N``: several processes on one port, with
/metrics and /health adding up all of them, started and stopped as one."""

import asyncio
import json
import os
import re
import signal
import socket

import aiohttp
import pytest
from conftest import Program
from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(r"serving on http://(\S+?):(\d+)/ with (\d+) workers \(pids ([\d ]+)\)")
SESSIONS = 40
# Fresh connections land on a worker by a hash of their port numbers; after
# this many, the chance that one worker was never reached is 2**-29.
SCRAPES = 30


@pytest.fixture
def program(tmp_path):
    started = []

    def start(*args: str) -> Program:
        started.append(Program(tmp_path, *args))
        return started[-1]

    yield start
    for prog in started:
        prog.kill()


def totals(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def scrape(base: str, path: str) -> tuple[int, str]:
    """GET on a new connection, so the kernel picks the worker afresh."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(base + path) as response:
            return response.status, await response.text()


async def open_sessions(http: aiohttp.ClientSession, base: str, count: int, prefix: str):
    sockets = []
    for i in range(count):
        ws = await http.ws_connect(base + "/ws")
        await ws.send_json({"type": "hello", "name": f"{prefix}{i}"})
        first = (await ws.receive(timeout=10)).data.split("\n")[0]
        assert json.loads(first)["type"] == "welcome"
        sockets.append(ws)
    return sockets


async def until(check, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def per_worker(log: str, what: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for worker in re.findall(rf"\[worker (\d+)\] {what}", log):
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def test_workers_share_the_port_and_metrics_and_health_add_up(program, server):
    gw = program("-m", "gateway", "--workers=2", "--http-port=0", f"--chat-port={server.port}",
                 f"--max-sessions-per-ip={SESSIONS + 10}", "--log-level=debug")
    host, port, count, pids = gw.wait_log(READY, timeout=30).groups()
    pids = [int(p) for p in pids.split()]
    assert count == "2" and len(pids) == 2 and all(alive(p) for p in pids)
    base = f"http://{host}:{port}"

    async def scenario() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sockets = await open_sessions(http, base, SESSIONS, "w")
            # Spread over both workers, which each count only their own.
            opened = per_worker(gw.log_text(), r"gateway\.bridge DEBUG session \S+ opened")
            assert sorted(opened) == ["0", "1"] and sum(opened.values()) == SESSIONS
            for _ in range(SCRAPES):
                status, text = await scrape(base, "/metrics")
                assert status == 200
                now = totals(text)
                assert now["gateway_sessions"] == SESSIONS
                assert now["gateway_messages_relayed_total{direction=to_server}"] == SESSIONS
                status, text = await scrape(base, "/health")
                assert status == 200 and json.loads(text)["sessions"] == SESSIONS
            served = per_worker(gw.log_text(), r"aiohttp\.access INFO .*\"GET /metrics")
            assert sorted(served) == ["0", "1"]  # both answered, with the same totals
            for ws in sockets:
                await ws.close()

            async def all_closed() -> bool:
                now = totals((await scrape(base, "/metrics"))[1])
                return (now["gateway_sessions"] == 0
                        and now["gateway_session_closes_total{reason=browser_closed}"]
                        == SESSIONS)
            await until(all_closed)

    asyncio.run(scenario())
    assert gw.terminate() == 0
    assert not any(alive(p) for p in pids)
    assert "stopping 2 workers" in gw.log_text()


def test_a_killed_worker_is_restarted_and_its_sessions_leave_the_totals(program, server):
    gw = program("-m", "gateway", "--workers=2", "--http-port=0", f"--chat-port={server.port}",
                 f"--max-sessions-per-ip={SESSIONS + 10}", "--log-level=debug")
    host, port, _, pids = gw.wait_log(READY, timeout=30).groups()
    victim = int(pids.split()[0])
    base = f"http://{host}:{port}"

    async def scenario() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sockets = await open_sessions(http, base, 20, "k")
            opened = per_worker(gw.log_text(), r"gateway\.bridge DEBUG session \S+ opened")
            os.kill(victim, signal.SIGKILL)
            gw.wait_log(r"worker 0 restarted", timeout=30)
            survivors = opened.get("1", 0)

            async def counted() -> bool:
                health = json.loads((await scrape(base, "/health"))[1])
                return health["sessions"] == survivors
            await until(counted)
            for ws in sockets:
                await ws.close()

    asyncio.run(scenario())
    assert "worker 0 (pid %d) exited with -9; restarting it" % victim in gw.log_text()
    assert gw.terminate() == 0


def test_a_busy_port_is_one_line_and_exit_1(program, server):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        gw = program("-m", "gateway", "--workers=2", f"--http-port={port}",
                     f"--chat-port={server.port}")
        assert gw.proc.wait(30) == 1
    assert f"HTTP port {port} is busy" in gw.log_text()
    assert "Traceback" not in gw.log_text()
