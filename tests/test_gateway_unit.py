"""The gateway's pure functions: addresses, origins, browser input, config."""

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import messages, policy
from gateway.config import (
    GatewayConfig,
    build_parser,
    config_from_args,
    normalize_origin,
    normalize_server_name,
)
from tcpserver import protocol

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("127.0.0.0/8"))


# --- the real client address ----------------------------------------------

@pytest.mark.parametrize("peer, xff, expected", [
    # An untrusted peer: its X-Forwarded-For is ignored, it may be forged.
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
    # A trusted proxy with nothing forwarded: the proxy itself.
    ("10.0.0.2", [], "10.0.0.2"),
    # The rightmost untrusted entry wins; anything left of it is the
    # client's own claim and is not believed.
    ("10.0.0.2", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
    ("10.0.0.2", ["6.6.6.6, 198.51.100.1, 10.1.2.3"], "198.51.100.1"),
    # Several headers are one list, in order.
    ("10.0.0.2", ["6.6.6.6", "198.51.100.1, 10.9.9.9"], "198.51.100.1"),
    # All hops trusted: the leftmost is the best we know.
    ("10.0.0.2", ["10.0.0.7, 10.0.0.8"], "10.0.0.7"),
    # Garbage stops the walk at the last trusted hop.
    ("10.0.0.2", ["198.51.100.1, not-an-ip"], "10.0.0.2"),
    ("10.0.0.2", ["198.51.100.1, junk, 10.0.0.3"], "10.0.0.3"),
    # IPv6 peers, bracketed entries, IPv4-mapped addresses.
    ("::1", ["2001:db8::5"], "2001:db8::5"),
    ("::1", ["[2001:db8::5]"], "2001:db8::5"),
    ("::ffff:10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
    ("::ffff:203.0.113.9", [], "203.0.113.9"),
    # Empty entries are skipped.
    ("10.0.0.2", [" , 198.51.100.1 ,"], "198.51.100.1"),
])
def test_client_address(peer, xff, expected):
    assert policy.client_address(peer, xff, NETS) == expected


@pytest.mark.parametrize("peer, xff, expected", [
    # Entries with a port (issue 6 item 5): the port is dropped.
    ("10.0.0.2", ["203.0.113.1:51001"], "203.0.113.1"),
    ("10.0.0.2", ["[2001:db8::2]:51002"], "2001:db8::2"),
    ("10.0.0.2", ["6.6.6.6:1, 198.51.100.1:443, 10.0.0.9:80"], "198.51.100.1"),
    ("10.0.0.2", ["198.51.100.1, 10.0.0.9:80"], "198.51.100.1"),
    # A port that is not one, or an unbracketed IPv6 with a port, is garbage.
    ("10.0.0.2", ["203.0.113.1:99999"], "10.0.0.2"),
    ("10.0.0.2", ["203.0.113.1:"], "10.0.0.2"),
    ("10.0.0.2", ["[2001:db8::2]x"], "10.0.0.2"),
    ("10.0.0.2", ["[2001:db8::2"], "10.0.0.2"),
    ("10.0.0.2", ["host.example:80"], "10.0.0.2"),
])
def test_client_address_drops_ports(peer, xff, expected):
    assert policy.client_address(peer, xff, NETS) == expected


@pytest.mark.parametrize("forwarded, expected", [
    ('for="[2001:db8::2]:51002"', "2001:db8::2"),
    ("for=203.0.113.1", "203.0.113.1"),
    ('for="203.0.113.1:51001"', "203.0.113.1"),
    ('For="[2001:db8::2]";proto=https;by=10.0.0.2', "2001:db8::2"),
    ("for=192.0.2.60; proto=http; by=203.0.113.43", "192.0.2.60"),  # RFC 7239 §4, with OWS
    # Rightmost untrusted, over elements and over several header lines.
    ("for=6.6.6.6, for=198.51.100.1, for=10.9.9.9", "198.51.100.1"),
    ('for=6.6.6.6;proto="a,b", for=198.51.100.1', "198.51.100.1"),  # comma inside quotes
    ("for=10.0.0.7, for=10.0.0.8", "10.0.0.7"),
    # unknown, obfuscated, missing for=, malformed or repeated: stop there.
    ("for=198.51.100.1, for=unknown", "10.0.0.2"),
    ('for=198.51.100.1, for="unknown:4711"', "10.0.0.2"),
    ("for=198.51.100.1, for=_hidden", "10.0.0.2"),
    ("for=198.51.100.1, for=_hidden, for=10.0.0.3", "10.0.0.3"),
    ("for=198.51.100.1, proto=https", "10.0.0.2"),
    ("for=198.51.100.1, for=1.2.3.4 junk", "10.0.0.2"),
    ("for=198.51.100.1, for=1.2.3.4;for=5.6.7.8", "10.0.0.2"),
    ('for="198.51.100.1', "10.0.0.2"),  # unterminated quote
    ("for=2001:db8::2", "10.0.0.2"),  # ":" is not a token: IPv6 must be quoted
    # Empty elements are skipped.
    (", for=198.51.100.1 ,", "198.51.100.1"),
    ("", "10.0.0.2"),
])
def test_client_address_from_forwarded(forwarded, expected):
    assert policy.client_address("10.0.0.2", [], NETS, [forwarded]) == expected


def test_forwarded_header_lines_are_one_list():
    lines = ["for=6.6.6.6", 'for="[2001:db8::9]:1", for=10.1.1.1']
    assert policy.client_address("10.0.0.2", [], NETS, lines) == "2001:db8::9"


def test_x_forwarded_for_wins_over_forwarded():
    # A proxy that writes X-Forwarded-For passes the client's own Forwarded
    # through: believing it would let the client pick its address.
    assert policy.client_address("10.0.0.2", ["198.51.100.1"], NETS,
                                 ["for=6.6.6.6"]) == "198.51.100.1"
    # An empty X-Forwarded-For names nobody; Forwarded is read.
    assert policy.client_address("10.0.0.2", [" "], NETS,
                                 ["for=198.51.100.2"]) == "198.51.100.2"


def test_untrusted_peer_forwarded_is_ignored():
    assert policy.client_address("203.0.113.9", [], NETS, ["for=198.51.100.1"]) \
        == "203.0.113.9"
    assert policy.client_address("203.0.113.9", ["198.51.100.1:5"], NETS,
                                 ['for="[2001:db8::2]:1"']) == "203.0.113.9"


def test_forwarded_elements_unquote():
    assert policy.forwarded_elements(['for="_a\\"b";by=x, ,for=y']) == [
        {"for": '_a"b', "by": "x"}, {"for": "y"}]
    assert policy.forwarded_elements(["for=a junk, for=b"]) == [None, {"for": "b"}]


ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None)
ports = st.integers(0, 65535)


@given(st.one_of(ipv4s, ipv6s), st.one_of(st.none(), ports), st.booleans())
def test_node_with_or_without_port_parses(ip, port, bracket):
    text = f"[{ip}]" if ip.version == 6 and (bracket or port is not None) else str(ip)
    if port is not None:
        text += f":{port}"
    assert policy.parse_node(text) == ip
    # The same node in a Forwarded header, quoted as RFC 7239 §6 requires.
    assert policy.client_address("10.0.0.2", [], NETS, [f'for="{text}"']) == str(ip) \
        or policy._trusted(ip, NETS)


@given(st.lists(st.tuples(st.one_of(ipv4s, ipv6s), st.one_of(st.none(), ports)),
                min_size=1, max_size=6), st.booleans())
def test_rightmost_untrusted_is_the_client(hops, as_forwarded):
    def node(ip, port):
        text = f"[{ip}]" if ip.version == 6 else str(ip)
        return text if port is None else f"{text}:{port}"

    nodes = [node(ip, port) for ip, port in hops]
    if as_forwarded:
        result = policy.client_address("10.0.0.2", [], NETS,
                                       [", ".join(f'for="{n}"' for n in nodes)])
    else:
        result = policy.client_address("10.0.0.2", [", ".join(nodes)], NETS)
    untrusted = [ip for ip, _ in hops if not policy._trusted(ip, NETS)]
    assert result == str(untrusted[-1] if untrusted else hops[0][0])


@given(st.text(max_size=80), st.text(max_size=80))
def test_client_address_never_raises(xff, forwarded):
    result = policy.client_address("10.0.0.2", [xff], NETS, [forwarded])
    assert ipaddress.ip_address(result)


def test_client_address_trusts_nobody_by_default():
    assert policy.client_address("127.0.0.1", ["198.51.100.1"], ()) == "127.0.0.1"


def test_client_address_unknown_peer():
    assert policy.client_address(None, ["198.51.100.1"], NETS) is None
    assert policy.client_address("not an ip", [], NETS) is None


# --- Host: the DNS-rebinding guard ---------------------------------------------

LOOPBACK_BIND = policy.served_hosts("127.0.0.1", (), ())


@pytest.mark.parametrize("host", [
    None, "localhost", "LOCALHOST:8080", "localhost.", "localhost.:80", "127.0.0.1",
    "127.0.0.1:8080", "127.9.8.7:1", "[::1]", "[::1]:8080", "[::ffff:127.0.0.1]:80",
    "127.0.0.1:",
])
def test_loopback_names_are_served(host):
    assert LOOPBACK_BIND.allows(host)


@pytest.mark.parametrize("host", [
    "rebind.attacker.example", "rebind.attacker.example:8080", "localhost.attacker.example",
    "127.0.0.1.attacker.example", "foo.localhost", "192.168.1.5:8080", "[2001:db8::1]:80",
    "::1", "[::1", "[::1]x", "127.0.0.1:99999", "127.0.0.1:8080:80", "local host", "",
    "127.1", "0x7f.0.0.1", "%6cocalhost", "[evil.example]",
])
def test_other_hosts_are_refused(host):
    assert not LOOPBACK_BIND.allows(host)


def test_bind_address_server_names_and_allowed_origin_hosts():
    served = policy.served_hosts(
        "192.168.1.5", ["chat.example.org", "203.0.113.4", "2001:db8::7"],
        ["https://proxy.example.net", "http://[2001:db8::8]:8080"])
    for host in ("192.168.1.5:8080", "chat.example.org", "CHAT.example.org.:443",
                 "203.0.113.4", "[2001:db8::7]:80", "proxy.example.net", "[2001:db8::8]:8080",
                 "localhost", "127.0.0.1"):
        assert served.allows(host), host
    for host in ("192.168.1.6", "other.example.org", "example.org", "sub.chat.example.org"):
        assert not served.allows(host), host
    assert served.allows("192.168.1.6", any_address=True)  # a monitor probing by IP
    assert not served.allows("other.example.org", any_address=True)


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", ""])
def test_wildcard_bind_serves_every_address_but_only_listed_names(bind):
    served = policy.served_hosts(bind, ["chat.example.org"], ())
    for host in ("192.168.1.6:8080", "[2001:db8::1]:8080", "10.0.0.1", "chat.example.org"):
        assert served.allows(host), host
    for host in ("rebind.attacker.example", "myhost"):
        assert not served.allows(host), host


def test_a_named_bind_is_served():
    assert policy.served_hosts("myhost.lan", (), ()).allows("MyHost.lan:8080")


labels = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)


@given(st.lists(labels, min_size=1, max_size=4), st.one_of(st.none(), ports))
def test_any_unlisted_name_is_refused(parts, port):
    name = ".".join(parts)
    host = name if port is None else f"{name}:{port}"
    allowed = LOOPBACK_BIND.allows(host)
    assert allowed == (name == "localhost")
    assert policy.served_hosts("127.0.0.1", [name], ()).allows(host)


@given(st.one_of(ipv4s, ipv6s), st.one_of(st.none(), ports))
def test_ip_literals_with_any_port(ip, port):
    text = f"[{ip}]" if ip.version == 6 else str(ip)
    host = text if port is None else f"{text}:{port}"
    assert policy.parse_host(host) == ip
    assert LOOPBACK_BIND.allows(host) == ip.is_loopback
    assert policy.served_hosts("::", (), ()).allows(host)


@given(st.text(max_size=60))
def test_host_check_never_raises(host):
    assert isinstance(LOOPBACK_BIND.allows(host), bool)


def test_served_hosts_describe():
    assert policy.served_hosts("0.0.0.0", ["b.example", "a.example"], ()).describe() == \
        "localhost, 127.0.0.0/8, ::1, any IP address, a.example, b.example"
    assert policy.served_hosts("127.0.0.1", [], ()).describe() == "localhost, 127.0.0.0/8, ::1"


# --- origins -------------------------------------------------------------

@pytest.mark.parametrize("origin, host, allowed, ok", [
    (None, "example.com", frozenset(), True),  # not a browser: no CSRF risk
    ("http://example.com:8080", "example.com:8080", frozenset(), True),
    ("http://EXAMPLE.com:8080", "example.COM:8080", frozenset(), True),
    ("https://example.com", "example.com", frozenset(), True),
    ("https://example.com", "example.com:443", frozenset(), True),
    ("http://example.com", "example.com:80", frozenset(), True),
    ("http://example.com:8081", "example.com:8080", frozenset(), False),
    ("http://evil.example", "example.com", frozenset(), False),
    ("http://example.com.evil.example", "example.com", frozenset(), False),
    ("null", "example.com", frozenset(), False),
    ("file://", "example.com", frozenset(), False),
    ("http://evil.example", None, frozenset(), False),
    ("https://chat.example.org", "127.0.0.1:8080",
     frozenset({"https://chat.example.org"}), True),
    ("https://chat.example.org:443", "127.0.0.1:8080",
     frozenset({"https://chat.example.org"}), True),
    ("http://chat.example.org", "127.0.0.1:8080",
     frozenset({"https://chat.example.org"}), False),
])
def test_origin_allowed(origin, host, allowed, ok):
    assert policy.origin_allowed(origin, host, allowed) is ok


@pytest.mark.parametrize("value, expected", [
    ("https://Chat.Example.org/", "https://chat.example.org"),
    ("https://chat.example.org:443", "https://chat.example.org"),
    ("http://chat.example.org:8080/some/path", "http://chat.example.org:8080"),
    ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_normalize_origin(value, expected):
    assert normalize_origin(value) == expected


@pytest.mark.parametrize("value", ["null", "chat.example.org", "ftp://x.org", ""])
def test_normalize_origin_rejects(value):
    with pytest.raises(ValueError):
        normalize_origin(value)


# --- browser input -------------------------------------------------------

def decode(frame: bytes) -> dict:
    decoder = protocol.FrameDecoder()
    decoder.receive_data(frame)
    return json.loads(decoder.next_payload())


def test_hello_gets_the_real_address_whatever_the_browser_claims():
    kind, frame = messages.browser_frame(
        '{"type":"hello","name":"bob","forwarded_for":"6.6.6.6"}', "198.51.100.1", 65536)
    assert kind == "hello"
    assert decode(frame) == {"type": "hello", "name": "bob", "forwarded_for": "198.51.100.1"}
    _, frame = messages.browser_frame(
        '{"type":"hello","name":"bob","forwarded_for":"6.6.6.6"}', None, 65536)
    assert decode(frame) == {"type": "hello", "name": "bob"}


def test_valid_messages_are_framed_by_the_codec_as_written():
    """Only a hello is encoded again (it gets forwarded_for); the rest pass
    the server's own checks, so their bytes go on as the browser wrote them."""
    for message in ({"type": "say", "text": "hi ✓"}, {"type": "who"},
                    {"type": "private", "to": "al", "text": "x"},
                    {"type": "history", "after": 3}, {"type": "pong", "token": "t"}):
        text = json.dumps(message)  # with spaces and \u escapes, unlike the codec
        kind, frame = messages.browser_frame(text, "1.2.3.4", 65536)
        assert kind == message["type"]
        assert frame == protocol.frame_payload(text.encode())
        assert decode(frame) == message


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"type": "nope"}', '{"type": "say"}', '{"type": "say", "text": 5}',
    '{"type": "say", "text": "   "}', json.dumps({"type": "say", "text": "x" * 4001}),
    json.dumps({"type": "private", "to": "a", "text": "y" * 4001}),
    '{"type": "say", "text": "bell\\u0007"}', '{"type": "history", "after": true}',
])
def test_bad_browser_input_raises(text):
    with pytest.raises(protocol.MessageError) as info:
        messages.browser_frame(text, "1.2.3.4", 65536)
    assert info.value.code == "bad_message"


def test_message_over_the_frame_limit_raises():
    text = json.dumps({"type": "say", "text": "é" * 3000})  # 6000+ bytes of UTF-8
    with pytest.raises(protocol.ProtocolError):
        messages.browser_frame(text, "1.2.3.4", 5000)
    # A hello that only overflows once forwarded_for is added.
    hello = json.dumps({"type": "hello", "name": "bob", "pad": "x" * 100})
    with pytest.raises(protocol.ProtocolError):
        messages.browser_frame(hello, "1.2.3.4", len(hello) + 5)


def test_close_reason_fits_a_close_frame_without_splitting_characters():
    reason = messages.close_reason("é" * 100)
    assert len(reason) <= 123
    assert reason.decode() == "é" * 61


def test_farewell_names_the_close():
    def payload(message):
        return protocol.encode_payload(message)

    assert messages.farewell(payload({"type": "shutdown", "message": "bye now"})) == \
        (1012, "bye now")
    assert messages.farewell(payload({"type": "error", "code": "idle_timeout",
                                     "message": "silent for 60 s"})) == \
        (1008, "silent for 60 s")
    assert messages.farewell(payload({"type": "error", "code": "server_full",
                                     "message": "full"})) == (1013, "full")
    # Errors that leave the connection open are not a reason to close.
    assert messages.farewell(payload({"type": "error", "code": "name_taken",
                                     "message": "taken"})) is None
    assert messages.farewell(payload({"type": "message", "seq": 1, "from": "a@b", "ts": 1,
                                     "text": '"error" "shutdown"'})) is None
    assert messages.farewell(payload({"type": "join", "seq": 1, "member": "a@b", "ts": 1})) \
        is None
    assert messages.farewell(b'"error" \xff') is None


# --- command line ----------------------------------------------------------

def test_command_line_fills_the_config():
    args = build_parser().parse_args([
        "--http-port", "0", "--chat-host", "10.1.1.1", "--chat-port", "9999",
        "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "192.168.1.1",
        "--allowed-origin", "https://Chat.Example.org/", "--max-sessions-per-ip", "3",
        "--queue-size", "50", "--server-name", "Chat.Example.COM.", "--server-name", "[::1]"])
    config = config_from_args(args)
    assert config == GatewayConfig(
        chat_host="10.1.1.1", chat_port=9999, http_port=0,
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),
                         ipaddress.ip_network("192.168.1.1/32")),
        allowed_origins=frozenset({"https://chat.example.org"}),
        server_names=frozenset({"chat.example.com", "::1"}),
        max_sessions_per_ip=3, queue_size=50)
    assert config.chat_address == "10.1.1.1:9999"


def test_command_line_defaults():
    config = config_from_args(build_parser().parse_args([]))
    assert config == GatewayConfig()
    assert config.trusted_proxies == () and config.allowed_origins == frozenset()
    assert config.server_names == frozenset()
    assert config.max_frame == protocol.MAX_FRAME_SIZE


@pytest.mark.parametrize("argv", [
    ["--trusted-proxy", "10.0.0.0/33"], ["--allowed-origin", "null"],
    ["--max-sessions-per-ip", "0"], ["--queue-size", "-1"],
    ["--server-name", "chat.example.com:443"], ["--server-name", "https://chat.example.com"],
    ["--server-name", ""], ["--server-name", "a..b"], ["--server-name", "a b"],
])
def test_command_line_errors(argv):
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(argv))


def test_out_of_range_port_is_a_usage_error():
    # argparse itself refuses it (exit 2, one line), before any config exists.
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--http-port", "70000"])
    assert info.value.code == 2


@pytest.mark.parametrize("name, expected", [
    ("Chat.Example.com.", "chat.example.com"), ("[2001:DB8::1]", "2001:db8::1"),
    ("2001:db8::1", "2001:db8::1"), ("192.0.2.1", "192.0.2.1"),
    ("bücher.example", "xn--bcher-kva.example"),
])
def test_normalize_server_name(name, expected):
    assert normalize_server_name(name) == expected


def test_ipv6_chat_address_is_bracketed():
    assert GatewayConfig(chat_host="::1", chat_port=5).chat_address == "[::1]:5"
