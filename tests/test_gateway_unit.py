"""The gateway's pure functions: addresses, origins, browser input, config."""

import ipaddress
import json

import pytest

from gateway import messages, policy
from gateway.config import GatewayConfig, build_parser, config_from_args, normalize_origin
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


def test_client_address_trusts_nobody_by_default():
    assert policy.client_address("127.0.0.1", ["198.51.100.1"], ()) == "127.0.0.1"


def test_client_address_unknown_peer():
    assert policy.client_address(None, ["198.51.100.1"], NETS) is None
    assert policy.client_address("not an ip", [], NETS) is None


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


def test_valid_messages_are_framed_by_the_codec():
    for message in ({"type": "say", "text": "hi ✓"}, {"type": "who"},
                    {"type": "private", "to": "al", "text": "x"},
                    {"type": "history", "after": 3}, {"type": "pong", "token": "t"}):
        kind, frame = messages.browser_frame(json.dumps(message), "1.2.3.4", 65536)
        assert kind == message["type"]
        assert frame == protocol.encode_frame(message)


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
        "--queue-size", "50"])
    config = config_from_args(args)
    assert config == GatewayConfig(
        chat_host="10.1.1.1", chat_port=9999, http_port=0,
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),
                         ipaddress.ip_network("192.168.1.1/32")),
        allowed_origins=frozenset({"https://chat.example.org"}),
        max_sessions_per_ip=3, queue_size=50)
    assert config.chat_address == "10.1.1.1:9999"


def test_command_line_defaults():
    config = config_from_args(build_parser().parse_args([]))
    assert config == GatewayConfig()
    assert config.trusted_proxies == () and config.allowed_origins == frozenset()
    assert config.max_frame == protocol.MAX_FRAME_SIZE


@pytest.mark.parametrize("argv", [
    ["--trusted-proxy", "10.0.0.0/33"], ["--allowed-origin", "null"],
    ["--max-sessions-per-ip", "0"], ["--queue-size", "-1"], ["--http-port", "70000"],
])
def test_command_line_errors(argv):
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(argv))


def test_ipv6_chat_address_is_bracketed():
    assert GatewayConfig(chat_host="::1", chat_port=5).chat_address == "[::1]:5"
