"""The sans-I/O codec: framing, validation, limits."""

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpserver import protocol
from tcpserver.protocol import FrameDecoder, FrameError, MessageError


def feed_bytewise(decoder: FrameDecoder, data: bytes) -> list[bytes]:
    payloads = []
    for i in range(len(data)):
        decoder.receive_data(data[i : i + 1])
        while (payload := decoder.next_payload()) is not None:
            payloads.append(payload)
    return payloads


SAMPLES = [
    {"type": "hello", "name": "bob"},
    {"type": "say", "text": "héllo, wörld ✓ 🎉"},
    {"type": "private", "to": "alice", "text": "line one\nline two\ttab"},
    {"type": "history", "after": 41},
    {"type": "ping"},
]


def test_header_is_four_bytes_big_endian():
    frame = protocol.encode_frame({"type": "who"})
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert json.loads(frame[4:]) == {"type": "who"}


def test_one_byte_at_a_time_round_trip():
    stream = b"".join(protocol.encode_frame(m) for m in SAMPLES)
    payloads = feed_bytewise(FrameDecoder(), stream)
    assert [protocol.parse_client_message(p) for p in payloads] == SAMPLES


def test_payloads_gives_what_next_payload_gives_in_one_call():
    stream = b"".join(protocol.encode_frame(m) for m in SAMPLES)
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        decoder.receive_data(stream[:cut])
        got = decoder.payloads()
        decoder.receive_data(stream[cut:])
        got += decoder.payloads()
        assert got == [protocol.encode_payload(m) for m in SAMPLES], cut
        assert decoder.payloads() == [] and decoder.buffered == 0


def test_payloads_of_reads_in_any_split_give_every_frame_once():
    stream = b"".join(protocol.encode_frame(m) for m in SAMPLES)
    want = [protocol.encode_payload(m) for m in SAMPLES]
    for cut in range(len(stream) + 1):
        for second in range(cut, len(stream) + 1, 7):
            decoder = FrameDecoder()
            got = decoder.payloads(stream[:cut]) + decoder.payloads(stream[cut:second])
            got += decoder.payloads(stream[second:])
            assert got == want, (cut, second)
            assert decoder.buffered == 0
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.payloads(stream[i : i + 1])
    assert got == want


def test_payloads_before_a_bad_length_are_kept_then_it_raises():
    decoder = FrameDecoder(max_frame_size=100)
    good = protocol.encode_frame({"type": "ping"})
    decoder.receive_data(good + good + struct.pack("!I", 101) + b"x" * 101)
    assert decoder.payloads() == [good[4:], good[4:]]
    with pytest.raises(FrameError):
        decoder.payloads()
    fresh = FrameDecoder(max_frame_size=100)  # the same, fed straight from a read
    assert fresh.payloads(good + good + struct.pack("!I", 0)) == [good[4:], good[4:]]
    with pytest.raises(FrameError):
        fresh.payloads()


def test_trailing_partial_frame_is_kept_for_later():
    frame = protocol.encode_frame({"type": "who"})
    decoder = FrameDecoder()
    decoder.receive_data(frame + frame[:5])
    assert decoder.next_payload() == frame[4:]
    assert decoder.next_payload() is None
    assert decoder.buffered == 5
    decoder.receive_data(frame[5:])
    assert decoder.next_payload() == frame[4:]
    assert decoder.buffered == 0


def test_truncated_frame_yields_nothing():
    frame = protocol.encode_frame({"type": "say", "text": "x" * 100})
    for cut in range(len(frame)):
        decoder = FrameDecoder()
        decoder.receive_data(frame[:cut])
        assert decoder.next_payload() is None


@pytest.mark.parametrize("header", [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                                    struct.pack(">I", protocol.MAX_FRAME_SIZE + 1)])
def test_bad_lengths_raise_frame_error(header):
    decoder = FrameDecoder()
    decoder.receive_data(header + b"{}")
    with pytest.raises(FrameError) as info:
        decoder.next_payload()
    assert info.value.code == "bad_frame"


def test_largest_frame_is_accepted_and_limit_is_configurable():
    payload = b'{"type":"say","text":"' + b"a" * (1000 - 24) + b'"}'
    assert len(payload) == 1000
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.receive_data(protocol.frame_payload(payload))
    assert decoder.next_payload() == payload
    decoder.receive_data(struct.pack(">I", 1001))
    with pytest.raises(FrameError):
        decoder.next_payload()


def test_encoder_refuses_oversized_payload():
    with pytest.raises(protocol.LocalProtocolError):
        protocol.encode_frame({"type": "say", "text": "x" * 100}, max_frame_size=50)


@given(st.dictionaries(st.text(min_size=1), st.text() | st.integers() | st.booleans()),
       st.lists(st.text()))
def test_frame_parts_join_to_the_frame_with_the_shared_value_last(message, value):
    message.pop("members", None)
    shared = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    head, middle, tail = protocol.encode_frame_parts(message, "members", shared)
    assert middle is shared  # the caller's object, not a copy
    frame = head + middle + tail
    (length,) = struct.unpack("!I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(frame[4:]) == {**message, "members": value}


def test_frame_parts_refuse_what_does_not_fit():
    with pytest.raises(protocol.LocalProtocolError):
        protocol.encode_frame_parts({"type": "members"}, "members", b'["' + b"x" * 60 + b'"]',
                                    max_frame_size=50)


@pytest.mark.parametrize("payload, fragment", [
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"type": "say", "text": "unterminated', "JSON"),
    (b"[1, 2, 3]", "object"),
    (b'"just a string"', "object"),
    (b'{"text": "no type"}', "type"),
    (b'{"type": 7}', "type"),
    (b'{"type": "launch_missiles"}', "unknown"),
    (b'{"type": "say"}', "missing"),
    (b'{"type": "say", "text": 5}', "must be str"),
    (b'{"type": "history", "after": "5"}', "must be int"),
    (b'{"type": "history", "after": true}', "must be int"),
    (b'{"type": "history", "after": 1.5}', "must be int"),
    (b'{"type": "hello", "name": ["bob"]}', "must be str"),
    (b'{"type": "say", "text": "\\u001b[2J"}', "control"),
    (b'{"type": "say", "text": "\\ud800"}', "control"),
    (b"[" * 50000 + b"]" * 50000, "JSON"),
    (b'{"type": "history", "after": ' + b"9" * 5000 + b"}", "JSON"),
])
def test_bad_payloads_raise_message_error(payload, fragment):
    with pytest.raises(MessageError) as info:
        protocol.parse_client_message(payload)
    assert info.value.code == "bad_message"
    assert fragment in info.value.message


def test_pickle_is_just_bad_json():
    import pickle

    with pytest.raises(MessageError):
        protocol.parse_client_message(pickle.dumps({"type": "say"}))


def test_unknown_fields_are_ignored():
    message = protocol.parse_client_message(b'{"type": "who", "future": 1}')
    assert message["type"] == "who"


def test_server_messages_validate():
    frame = protocol.encode_frame({"type": "message", "seq": 1, "from": "a@1.2.3.4",
                                   "text": "hi", "ts": 5})
    assert protocol.parse_server_message(frame[4:])["seq"] == 1
    with pytest.raises(MessageError):
        protocol.parse_server_message(b'{"type": "message", "seq": "1"}')


@pytest.mark.parametrize("name", ["bob", "B0b.smith-2_x", "a" * 32])
def test_good_names(name):
    protocol.check_name(name)


@pytest.mark.parametrize("name", ["", "a" * 33, "bob smith", "bób", "bob@host", "server",
                                  "SERVER", "<b>"])
def test_bad_names(name):
    with pytest.raises(MessageError) as info:
        protocol.check_name(name)
    assert info.value.code == "name_invalid"


@pytest.mark.parametrize("text", ["", "   \n\t", "x" * (protocol.MAX_TEXT_CHARS + 1)])
def test_bad_texts(text):
    with pytest.raises(MessageError):
        protocol.check_text(text)


def test_longest_text_fits_in_a_server_frame_even_fully_escaped():
    text = "\u2028" * protocol.MAX_TEXT_CHARS  # escaped by no one, 3 bytes each
    worst = '"' * protocol.MAX_TEXT_CHARS  # escaped as \" by JSON
    for t in (text, worst):
        protocol.encode_frame({"type": "message", "seq": 2**53, "from": "n" * 32 + "@" + "f" * 45,
                               "text": t, "ts": 2**53})


# --- properties ------------------------------------------------------------

json_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=200)
client_messages = st.one_of(
    st.builds(lambda n: {"type": "hello", "name": n}, json_text),
    st.builds(lambda t: {"type": "say", "text": t}, json_text),
    st.builds(lambda to, t: {"type": "private", "to": to, "text": t}, json_text, json_text),
    st.builds(lambda a: {"type": "history", "after": a}, st.integers(-2**63, 2**63)),
    st.just({"type": "who"}),
    st.just({"type": "quit"}),
)


@given(st.lists(client_messages, max_size=10), st.integers(1, 50))
def test_round_trip_in_any_chunking(messages, chunk):
    stream = b"".join(protocol.encode_frame(m) for m in messages)
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        decoder.receive_data(stream[i : i + chunk])
        while (payload := decoder.next_payload()) is not None:
            out.append(protocol.parse_client_message(payload))
    assert out == messages
    assert decoder.buffered == 0


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_protocol_errors(data):
    decoder = FrameDecoder(max_frame_size=1024)
    decoder.receive_data(data)
    try:
        while (payload := decoder.next_payload()) is not None:
            try:
                protocol.parse_client_message(payload)
            except MessageError:
                pass
    except FrameError:
        pass


@given(st.binary(min_size=1, max_size=500))
def test_arbitrary_payloads_raise_only_message_errors(payload):
    for parse in (protocol.parse_client_message, protocol.parse_server_message):
        try:
            parse(payload)
        except MessageError:
            pass


# --- PROTOCOL.md stays in step with the code --------------------------------

def _table_after(heading: str) -> dict[str, str]:
    """First-column code -> last column, for the table after ``heading``."""
    from conftest import ROOT

    text = (ROOT / "tcpserver" / "PROTOCOL.md").read_text()
    section = text[text.index(heading):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells[-1]
    return rows


def test_error_codes_are_documented_with_whether_they_close():
    table = _table_after("### `error`")
    assert set(table) == set(protocol.ERROR_CODES)
    closing = {code for code, then in table.items() if then == "closed"}
    assert closing == protocol.CLOSING_ERRORS


def test_leave_reasons_are_documented():
    assert set(_table_after("Leave reasons:")) == set(protocol.LEAVE_REASONS)


def test_every_message_type_is_documented():
    from conftest import ROOT

    text = (ROOT / "tcpserver" / "PROTOCOL.md").read_text()
    for kind in [*protocol.CLIENT_MESSAGES, *protocol.SERVER_MESSAGES]:
        assert f'"type": "{kind}"' in text, kind
