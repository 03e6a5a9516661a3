"""Deployment: nginx in front of several web gateways.

``nginx.conf.template`` (next to this file) is the configuration the README
documents; ``render_nginx`` fills in its ports and a prefix directory, and
``nginx_argv`` is the command that runs it as the current user.  The demo
(``python -m gateway.demo``) and tests/test_deploy.py both run exactly this
rendered file.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import jinja2

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
# Debian's package puts it here; PATH is the fallback.
NGINX = "/usr/sbin/nginx"
# Temp directories nginx may need, created inside the prefix.
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_nginx(prefix: Path, listen: str, gateways: Sequence[str],
                 log_level: str = "notice") -> Path:
    """Write ``prefix/nginx.conf`` from the template and return its path.

    ``prefix``: a directory nginx may write (pid, logs, temp files; created
    if missing).  ``listen``: nginx's ``listen`` value, e.g.
    ``"127.0.0.1:8000"``.  ``gateways``: ``"host:port"`` of each gateway.
    ``log_level``: nginx's error_log level (``debug`` .. ``emerg``).
    Raises ValueError for no gateways, OSError if the prefix is not writable.
    """
    if not gateways:
        raise ValueError("nginx needs at least one gateway")
    prefix = Path(prefix).resolve()
    for name in _TEMP_DIRS:
        (prefix / "tmp" / name).mkdir(parents=True, exist_ok=True)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    text = env.from_string(TEMPLATE.read_text()).render(
        prefix=str(prefix), listen=listen, gateways=list(gateways), log_level=log_level,
        user=_user_directive())
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def _user_directive() -> str:
    # nginx started by root switches its workers to "nobody", who cannot
    # write a private prefix; keep them as the user who ran us.  For anyone
    # else the directive is ignored with a warning, so it is left out.
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def nginx_binary() -> str:
    """Debian's /usr/sbin/nginx, else ``nginx`` from PATH; raises
    FileNotFoundError (naming the Debian package) if there is none."""
    if os.access(NGINX, os.X_OK):
        return NGINX
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "nginx"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")


def nginx_argv(conf: Path) -> list[str]:
    """The command that runs nginx on a rendered ``conf`` in the foreground
    (``daemon off`` in the file): its prefix is the file's directory, and
    ``-e`` keeps even start-up errors out of /var/log/nginx."""
    prefix = conf.parent
    return [nginx_binary(), "-p", f"{prefix}/", "-c", str(conf),
            "-e", str(prefix / "error.log")]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for programs that cannot bind
    port 0 and say which port they got, like nginx and redis-server)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True if ``host:port`` can be bound now (nothing listens there)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _poll_until(ready, timeout: float, alive) -> bool:
    """Call ``ready()`` every 50 ms until it is True; False if ``timeout``
    seconds pass or ``alive()`` turns False first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if not alive():
            return False
        time.sleep(0.05)
    return False


def wait_nginx(conf: Path, pid: int, timeout: float, alive=lambda: True) -> bool:
    """Poll until nginx started on ``conf`` (its master ``pid``) has written
    its pid file, which it does only once its listening sockets are bound;
    False if ``timeout`` seconds pass or ``alive()`` turns False first."""
    pid_file = conf.parent / "nginx.pid"

    def written() -> bool:
        try:
            return pid_file.read_text().strip() == str(pid)
        except FileNotFoundError:
            return False
    return _poll_until(written, timeout, alive)


def wait_port(host: str, port: int, timeout: float, alive=lambda: True) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False if ``timeout``
    seconds pass or ``alive()`` turns False first."""
    def accepts() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False
    return _poll_until(accepts, timeout, alive)
