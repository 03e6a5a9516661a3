"""The command lines: port checks for every command, and the layering rule
(tcpserver never imports gateway; ``chatroom`` lives in gateway.cli)."""

import argparse
import ast
import os
import re
import subprocess
import sys

import pytest
from conftest import LISTENING, ROOT, Program

from tcpserver import cli, settings

CHATROOM = ("-m", "gateway.cli")
TCPSERVER = ("-m", "tcpserver")
GATEWAY = ("-m", "gateway")


@pytest.mark.parametrize("text, value", [("0", 0), ("1", 1), ("10000", 10000),
                                         ("65535", 65535)])
def test_port_type_accepts_the_port_range(text, value):
    assert cli.port(text) == value


@pytest.mark.parametrize("text", ["65536", "99999", "-1", "", "ten", "1.5",
                                  "9" * 40])
def test_port_type_refuses_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.port(text)


BAD_PORTS = [
    (CHATROOM, "--name=zed", "--port=99999"),
    (CHATROOM, "--name=zed", "--port=-1"),
    (CHATROOM, "--name=server", "--port=99999"),
    (CHATROOM, "--name=server", "--port=-1"),
    (CHATROOM, "--port=99999"),
    (CHATROOM, "--port=-1"),
    (CHATROOM, "--http-port=99999"),
    (CHATROOM, "--http-port=-1"),
    (CHATROOM, "--name=server", "--port", "65536"),
    (TCPSERVER, "--name=server", "--port=99999"),
    (TCPSERVER, "--name=bob", "--port=-1"),
    (GATEWAY, "--http-port=99999"),
    (GATEWAY, "--http-port=-1"),
    (GATEWAY, "--chat-port=99999"),
    (GATEWAY, "--chat-port=-1"),
]


@pytest.mark.parametrize("command", BAD_PORTS, ids=lambda c: " ".join(c[0][1:] + c[1:]))
def test_out_of_range_port_is_one_line_and_exit_2(command):
    module, *options = command
    result = subprocess.run([sys.executable, *module, *options], capture_output=True,
                            text=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    option = next(o for o in options if o.startswith("--") and "port" in o).split("=")[0]
    assert f"argument {option}:" in lines[0] and "out of range 0-65535" in lines[0]
    assert result.stdout == ""


BAD_SERVER_VALUES = ["--redis=http://x", "--redis=redis://h/notanumber",
                     "--trusted-proxy=garbage", "--retain-events=0", "--retain-days=-1",
                     "--msg-rate=-1", "--max-frame=10", "--history=0", "--msg-rate=nan",
                     "--idle-timeout=inf", "--retain-days=nan", "--shutdown-grace=nan"]


@pytest.mark.parametrize("module", [CHATROOM, TCPSERVER], ids=["chatroom", "tcpserver"])
@pytest.mark.parametrize("bad", BAD_SERVER_VALUES)
def test_bad_server_option_values_are_one_usage_line(module, bad, tmp_path):
    # Checked before anything starts, for the server and for bare chatroom
    # (which passes them on), naming the option: never a log line, exit 2.
    forms = [["--name=server", bad]] + ([[bad]] if module is CHATROOM else [])
    for options in forms:
        result = subprocess.run([sys.executable, *module, "--port=0", *options],
                                capture_output=True, text=True, timeout=30, cwd=ROOT,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and ": error: " + bad.split("=")[0] in lines[0], result.stderr
        assert not list(tmp_path.iterdir())  # nothing was started or created


BAD_ROOMS = ["", "a:b", "{main}", "x" * 65]
NO_REDIS = "--redis=redis://127.0.0.1:1/0"  # nothing listens on port 1
ROOM_FORMS = [
    (CHATROOM, ["--name=server", "--port=0", NO_REDIS]),
    (CHATROOM, ["--port=0", NO_REDIS]),
    (CHATROOM, ["--name=server", "--port=0"]),  # unused without --redis, still refused
    (TCPSERVER, ["--name=server", "--port=0", NO_REDIS]),
    (("-m", "gateway.demo"), ["--port=0"]),
]


@pytest.mark.parametrize("module, options", ROOM_FORMS,
                         ids=[f"{m[1]} {' '.join(o)}" for m, o in ROOM_FORMS])
@pytest.mark.parametrize("room", BAD_ROOMS, ids=["empty", "colon", "braces", "65-chars"])
def test_a_bad_room_name_is_one_usage_line(module, options, room, tmp_path):
    # Refused before anything starts, like every other bad value: before,
    # a server got as far as Redis and exited 1 with a log line, and
    # without --redis the value was taken without a word.
    extra = [f"--state={tmp_path / 'demo'}"] if module[1] == "gateway.demo" else []
    result = subprocess.run([sys.executable, *module, *options, f"--room={room}", *extra],
                            capture_output=True, text=True, timeout=30, cwd=ROOT,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: --room" in lines[0], result.stderr
    assert "1-64 letters, digits" in lines[0]
    assert result.stdout == "" and not list(tmp_path.iterdir())  # nothing started or created


# (command, options, the options the error must name): each option is one
# the chosen mode never reads, so taking it without a word misleads.
MISPLACED = [
    (CHATROOM, ["--name=bob", "--port=1", "--max-clients", "5", "--redis", "redis://x",
                "--http-port", "9"], ["--max-clients", "--redis", "--http-port"]),
    (CHATROOM, ["--name=server", "--http-port", "9000"], ["--http-port"]),
    # Given with its default value still counts as given.
    (CHATROOM, ["--name=server", "--http-port=8080"], ["--http-port"]),
    (CHATROOM, ["--name=bob", "--max-clients=10000"], ["--max-clients"]),
    (CHATROOM, ["--name=bob", "--log-level=debug"], ["--log-level"]),
    (CHATROOM, ["--name=bob", "--trusted-proxy=::1"],
     ["--trusted-proxy"]),
    (TCPSERVER, ["--name=bob", "--port=1", "--max-clients", "5", "--redis", "redis://x"],
     ["--max-clients", "--redis"]),
    (TCPSERVER, ["--name=bob", "--db=:memory:", "--room=main"], ["--db", "--room"]),
    # A bad value of an option the mode does not use: the misplacement is the error.
    (TCPSERVER, ["--name=bob", "--redis=http://x"], ["--redis"]),
]


@pytest.mark.parametrize("module, options, named", MISPLACED,
                         ids=[f"{m[1]} {' '.join(o)}" for m, o, _ in MISPLACED])
def test_options_the_mode_does_not_use_are_a_usage_error(module, options, named, tmp_path):
    result = subprocess.run([sys.executable, *module, *options], capture_output=True,
                            text=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ": error: " + ", ".join(named) + " do" in lines[0], result.stderr
    assert "not apply to" in lines[0]
    assert result.stdout == "" and not list(tmp_path.iterdir())


@pytest.mark.parametrize("module, options", [
    (CHATROOM, ["--name=bob", "--port=1", "--host=localhost"]),
    (CHATROOM, ["--name=server", "--port=0", "--redis=redis://x", "--log-level=debug"]),
    (CHATROOM, ["--port=0", "--http-port=0", "--max-clients=5"]),
    (TCPSERVER, ["--name=server", "--port=0", "--db=:memory:"]),
])
def test_options_the_mode_uses_pass_the_mode_check(module, options):
    from gateway.cli import build_parser as chatroom_parser

    parser = chatroom_parser() if module is CHATROOM else cli.build_parser()
    args = parser.parse_args(options)
    cli.check_mode(parser, args, options, gateway_options=frozenset({"http_port"}))
    # The check leaves the parser's defaults as they were.
    assert parser.parse_args([]).port == cli.DEFAULT_PORT


def test_given_options_are_those_on_the_command_line():
    parser = cli.build_parser()
    assert parser.given(["--name=bob", "--port=10000", "--trusted-proxy=::1",
                         "--trusted-proxy=10.0.0.0/8"]) == {
        "name": "--name", "port": "--port", "trusted_proxy": "--trusted-proxy"}
    assert parser.given([]) == {}
    assert parser.parse_args([]).max_clients == settings.Limits().max_clients


BAD_GATEWAY_VALUES = ["--workers=0", "--workers=-2", "--queue-size=0",
                      "--max-sessions-per-ip=-1", "--max-frame=0",
                      "--trusted-proxy=garbage", "--allowed-origin=ftp://x",
                      "--server-name=http://x:80", "--chat-port=0"]


@pytest.mark.parametrize("bad", BAD_GATEWAY_VALUES)
def test_bad_gateway_option_values_are_one_usage_line(bad):
    # The parser's own form, as for --http-port=99999: never a log line.
    result = subprocess.run([sys.executable, *GATEWAY, "--http-port=0", bad],
                            capture_output=True, text=True, timeout=30, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    option = bad.split("=")[0]
    assert len(lines) == 1 and lines[0].startswith(f"python -m gateway: error: {option}"), \
        result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("module, script", [("gateway.demo", "chatroom-demo"),
                                            ("gateway.cli", "chatroom")])
def test_usage_names_the_command_as_it_was_invoked(module, script, tmp_path):
    # A console script (bin/chatroom-demo) is named as such; python -m as python -m.
    as_script = (f"import sys; sys.argv = [{str(tmp_path / 'bin' / script)!r}, '--help']\n"
                 f"from {module} import main; main()")
    runs = {script: [sys.executable, "-c", as_script],
            f"python -m {module}": [sys.executable, "-m", module, "--help"]}
    for prog, argv in runs.items():
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {prog} ["), result.stdout


def test_tcpserver_without_name_says_what_to_run():
    result = subprocess.run([sys.executable, *TCPSERVER, "--port=0"], capture_output=True,
                            text=True, timeout=30, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--name is required" in result.stderr
    assert "chatroom" in result.stderr


# --- layering ----------------------------------------------------------------

def _imports(path) -> set[str]:
    """Top-level package names that ``path`` imports, anywhere in its body."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_no_tcpserver_module_imports_gateway():
    modules = sorted((ROOT / "tcpserver").glob("*.py"))
    assert len(modules) > 5
    offenders = [p.name for p in modules if "gateway" in _imports(p)]
    assert offenders == []


def test_chatroom_script_is_the_gateway_dispatcher():
    # (tomllib is 3.11+; the project supports 3.10)
    text = (ROOT / "pyproject.toml").read_text()
    scripts = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    assert re.findall(r'^chatroom\s*=\s*"([^"]+)"', scripts, re.M) == ["gateway.cli:main"]


def test_tcpserver_runs_the_server_without_gateway(tmp_path):
    # gateway made unimportable: `python -m tcpserver --name=server` must not care.
    probe = (
        "import runpy, sys\n"
        "sys.modules['gateway'] = None\n"
        "sys.argv = ['tcpserver', '--name=server', '--port=0', '--shutdown-grace=0.1']\n"
        "runpy.run_module('tcpserver', run_name='__main__')\n"
    )
    server = Program(tmp_path, "-c", probe)
    try:
        server.wait_log(LISTENING, timeout=15)
        assert server.terminate() == 0, server.log_text()
    finally:
        server.kill()
    assert "Traceback" not in server.log_text()


# --- server options pass through the launcher -----------------------------------

def _other_value(action: argparse.Action):
    """A value for ``action`` that is not its default, as it would be parsed."""
    if action.nargs == 0:
        return not action.default
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    if isinstance(action, argparse._AppendAction):
        return ["10.0.0.0/8", "192.0.2.1"]
    if action.type in (int, float):
        return action.type((action.default or 0) * 3 + 7)  # None: "not given"
    if action.type is not None and action.type is not str:
        return action.type("9100")  # a validating type (a port): a value it accepts
    return "some-value"


def test_every_server_option_passes_through_to_the_server():
    # chatroom's parser and the server's must agree on every server option,
    # whichever options settings.add_arguments grows.
    from gateway.cli import build_parser as chatroom_parser

    group = argparse.ArgumentParser(add_help=False)
    settings.add_arguments(group)
    actions = [a for a in group._actions if a.option_strings]
    assert len(actions) > 10
    argv = []
    for action in actions:
        value = _other_value(action)
        option = max(action.option_strings, key=len)
        if action.nargs == 0:
            argv.append(option)
        else:
            argv.extend(f"{option}={v}" for v in (value if isinstance(value, list) else [value]))
    launched = chatroom_parser().parse_args(argv)
    passed = settings.arguments_to_argv(launched)
    server = cli.build_parser().parse_args(["--name=server", *passed])
    for action in actions:
        assert getattr(server, action.dest) == _other_value(action), action.dest
    # Defaults are not repeated.
    assert settings.arguments_to_argv(chatroom_parser().parse_args([])) == []
