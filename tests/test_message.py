"""Reading a message as received: what the filters, the rules and our own mail rely on.

``postoffice.message`` reads raw bytes from a sender, who may write
anything; every function here must give "no value" rather than raise, and
decode what can be decoded the way a mail program would show it.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postoffice.message import (
    ParsedMessage,
    added_headers,
    decode_bytes,
    decode_rfc2047,
    decode_text,
    domain_of,
    line_ending,
    normalize_message_id,
    parse_addresses,
    safe_header,
    split_headers,
)
from postoffice.store import stored_message
from tests.helpers import message, message_bytes, python_corpus, shared_corpus

# Header values that make the ``email`` package raise when they are read
# with ``policy.default`` (IndexError, AttributeError deep in its parser).
RAISING_HEADERS = [
    b"To: a@",
    b"To: <",
    b'To: "a" <',
    b"To: g:; <x>",
    b'Cc: a@b.c, "',
    b"From: =?utf-8?q?x?= <",
    b"Message-Id: <",
]

HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- decode_bytes ----------------------------------------------------------------------


def test_decode_bytes_reads_utf8_when_it_is_valid() -> None:
    assert decode_bytes("Grüße".encode()) == "Grüße"


def test_decode_bytes_falls_back_to_latin1() -> None:
    assert decode_bytes(b"Gr\xfc\xdfe \xff") == "Grüße ÿ"


@HYPOTHESIS
@given(st.binary(max_size=200))
def test_decode_bytes_never_fails_and_loses_nothing(raw: bytes) -> None:
    text = decode_bytes(raw)
    assert raw in (text.encode("utf-8", "surrogatepass"), text.encode("latin-1", "replace"))


# --- decode_rfc2047 --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=?utf-8?q?caf=C3=A9?=", "café"),
        ("=?UTF-8?Q?a_b?=", "a b"),
        ("=?utf-8?b?YWJj?=", "abc"),
        ("=?utf-8?B?YWJ?=", "ab"),  # padding left out
        ("=?iso-8859-1?q?caf=E9?=", "café"),
        ("=?UTF-8*en?q?hi?=", "hi"),  # RFC 2231 language suffix
        ("=?utf-8?q??=", ""),
    ],
)
def test_rfc2047_words_are_decoded(value: str, expected: str) -> None:
    assert decode_rfc2047(value) == expected


def test_rfc2047_text_around_the_words_stays() -> None:
    assert decode_rfc2047("Re: =?utf-8?q?caf=C3=A9?= [ticket 7]") == "Re: café [ticket 7]"
    assert decode_rfc2047("=?utf-8?q?a?= text =?utf-8?q?b?=") == "a text b"


def test_rfc2047_whitespace_between_words_is_dropped() -> None:
    assert decode_rfc2047("=?utf-8?q?a?=   =?iso-8859-1?q?b?=") == "ab"
    assert decode_rfc2047("=?utf-8?q?a?=\r\n =?utf-8?q?b?=") == "ab"  # a folded header


def test_rfc2047_a_character_split_across_two_words() -> None:
    # Encoders cut long subjects between the bytes of one character.
    assert decode_rfc2047("=?utf-8?q?caf=C3?= =?utf-8?q?=A9?=") == "café"
    assert decode_rfc2047("=?utf-8?b?w6k=?= =?utf-8?b?w6k=?=") == "éé"


def test_rfc2047_mixed_with_raw_8bit_text() -> None:
    # email.header.decode_header leaves every word undecoded in such a value.
    assert decode_rfc2047("Grüße =?utf-8?q?caf=C3=A9?=") == "Grüße café"


@pytest.mark.parametrize(
    "value",
    [
        "=?utf-8?b?!!!?= rest",  # not base64
        "=?utf-8?x?abc?=",  # no such encoding
        "=?utf-8?q?never closed",
        "=?utf-8?b?w6k",
        "?= =?",
        "=?" * 40,
    ],
)
def test_rfc2047_broken_words_stay_as_written(value: str) -> None:
    assert decode_rfc2047(value) == value


def test_rfc2047_a_broken_word_does_not_stop_the_good_ones() -> None:
    value = "=?utf-8?b?!!!?= and =?utf-8?q?caf=C3=A9?="
    assert decode_rfc2047(value) == "=?utf-8?b?!!!?= and café"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=?x-unknown?q?abc?=", "abc"),
        ("=?x-unknown?q?caf=C3=A9?=", "café"),  # then UTF-8
        ("=?x-unknown?q?caf=E9?=", "café"),  # then ISO-8859-1
        ("=?utf-8?q?caf=E9?=", "café"),  # declared UTF-8, bytes are not
        ("=?utf-8//TRANSLIT?q?caf=C3=A9?=", "café"),
    ],
)
def test_rfc2047_unknown_or_wrong_charsets_degrade(value: str, expected: str) -> None:
    assert decode_rfc2047(value) == expected


def test_rfc2047_decodes_what_a_sender_hid_and_leaves_flattening_to_the_caller() -> None:
    assert decode_rfc2047("=?utf-8?q?a=0D=0ABcc:_x?=") == "a\r\nBcc: x"


@HYPOTHESIS
@given(st.text(max_size=120))
def test_rfc2047_never_raises_and_leaves_plain_text_alone(value: str) -> None:
    decoded = decode_rfc2047(value)
    assert isinstance(decoded, str)
    if "=?" not in value:
        assert decoded == value


@HYPOTHESIS
@given(
    st.lists(
        st.sampled_from(["utf-8", "iso-8859-1", "x-unknown", "utf-8*en", ""]),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.text(alphabet="=?_ABCabc019+/\r\n \t\x00é", max_size=12), min_size=4, max_size=4),
)
def test_rfc2047_never_raises_on_words_good_or_broken(
    charsets: list[str], texts: list[str]
) -> None:
    words = [
        f"=?{cs}?{'qb'[n % 2]}?{t}?="
        for n, (cs, t) in enumerate(zip(charsets, texts, strict=False))
    ]
    for value in (" ".join(words), "".join(words)):
        # Never raises, and never longer than what was written: a word decodes to less.
        assert len(decode_rfc2047(value)) <= len(value)


# --- split_headers ---------------------------------------------------------------------


def test_split_headers_unfolds_and_finds_the_body() -> None:
    raw = b"Subject:  a\r\n\tb  \r\n c\r\nX-Other: d\r\n\r\nbody\r\n"
    headers, offset = split_headers(raw)
    assert headers == [("Subject", "a b c"), ("X-Other", "d")]
    assert raw[offset:] == b"body\r\n"


def test_split_headers_keeps_names_as_written_and_values_undecoded() -> None:
    headers, _ = split_headers(b"SUBJECT: =?utf-8?q?caf=C3=A9?=\nx-latin: caf\xe9\n\n")
    assert headers == [("SUBJECT", "=?utf-8?q?caf=C3=A9?="), ("x-latin", "café")]


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_split_headers_whatever_the_line_ends(eol: bytes) -> None:
    raw = message_bytes([b"A: 1", b"B: 2"], b"body", eol)
    headers, offset = split_headers(raw)
    assert headers == [("A", "1"), ("B", "2")]
    assert raw[offset:] == b"body"


def test_split_headers_skips_what_is_not_a_header() -> None:
    raw = b" continuation first\nno colon here\nSub ject: space in the name\nGood: yes\nEmpty:\n\n"
    headers, _ = split_headers(raw)
    assert headers == [("Good", "yes"), ("Empty", "")]


def test_split_headers_a_name_may_have_space_before_its_colon() -> None:
    assert split_headers(b"Name   : v\n\n")[0] == [("Name", "v")]


def test_split_headers_an_8bit_name_is_not_a_header() -> None:
    assert split_headers(b"Caf\xc3\xa9: x\nOk: y\n\n")[0] == [("Ok", "y")]


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_split_headers_an_empty_first_line_means_no_headers(eol: bytes) -> None:
    raw = eol + b"Subject: looks like one" + eol + eol + b"body"
    headers, offset = split_headers(raw)
    assert headers == []
    assert raw[offset:] == b"Subject: looks like one" + eol + eol + b"body"


def test_split_headers_without_an_empty_line_everything_is_headers() -> None:
    raw = b"A: 1\nB: 2"
    assert split_headers(raw) == ([("A", "1"), ("B", "2")], len(raw))
    assert split_headers(b"") == ([], 0)


@HYPOTHESIS
@given(st.binary(max_size=300))
def test_split_headers_never_raises(raw: bytes) -> None:
    headers, offset = split_headers(raw)
    assert 0 <= offset <= len(raw)
    for name, value in headers:
        assert name and ":" not in name and "\n" not in value and "\r" not in value


# --- ParsedMessage: guarded reads ----------------------------------------------------------


def test_header_reads_ignore_case_and_take_the_first() -> None:
    parsed = ParsedMessage(b"subject: =?utf-8?q?caf=C3=A9?=\nSUBJECT: second\n\n")
    assert parsed.get("Subject") == "café"
    assert parsed.get_raw("SUBJECT") == "=?utf-8?q?caf=C3=A9?="
    assert parsed.get_all_raw("Subject") == ["=?utf-8?q?caf=C3=A9?=", "second"]
    assert parsed.headers == (("subject", "café"), ("SUBJECT", "second"))
    assert parsed.get("X-Absent") is None


def test_addresses_of_every_header_of_a_name_or_of_the_first() -> None:
    parsed = ParsedMessage(b"To: A@B.test, c@D.test\nto: e@f.test\n\n")
    assert parsed.addresses("To") == ["a@b.test", "c@d.test", "e@f.test"]
    assert parsed.addresses("to", first_only=True) == ["a@b.test", "c@d.test"]
    assert parsed.addresses("Cc") == []


def test_from_address_and_message_id() -> None:
    parsed = ParsedMessage(message(7, sender='"Big Boss" <Boss@Outside.example>'))
    assert parsed.from_address == "boss@outside.example"
    assert parsed.message_id == "<7@outside.example>"
    assert len(parsed) == len(parsed.raw)


@pytest.mark.parametrize("header", RAISING_HEADERS)
def test_headers_that_make_email_raise_read_as_no_value(header: bytes) -> None:
    raw = header + b"\r\n\r\nbody\r\n"
    name, _, value = header.decode().partition(": ")
    with pytest.raises((IndexError, AttributeError)):  # the hazard this module guards against
        str(stored_message(raw)[name])
    parsed = ParsedMessage(raw)
    assert parsed.get(name) == decode_rfc2047(value)
    assert parsed.addresses(name) == (["a@b.c"] if name == "Cc" else [])
    assert parsed.from_address is None
    assert parsed.message_id is None
    assert list(parsed.text_parts()) == ["body\n"]


def test_a_message_of_only_hostile_headers_reads_as_no_value() -> None:
    raw = b"\r\n".join(RAISING_HEADERS) + b"\r\nSubject: =?utf-8?b?!!!?=\r\n\r\nbody\r\n"
    parsed = ParsedMessage(raw)
    assert parsed.addresses("To") == []
    assert parsed.addresses("Cc") == ["a@b.c"]  # the good address before the broken quote
    assert parsed.from_address is None
    assert parsed.message_id is None
    assert parsed.get("Subject") == "=?utf-8?b?!!!?="


def test_deeply_nested_comments_are_skipped_not_fatal() -> None:
    nested = "(" * 3000 + "x" + ")" * 3000 + " a@b.test"
    parsed = ParsedMessage(f"To: {nested}\nTo: c@d.test\n\n".encode())
    assert parsed.addresses("To") == ["c@d.test"]


def test_text_parts_decode_each_text_part_by_its_charset() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain; charset=koi8-r\n\n\xc1\xda\r\nline\r\n"
        b"--b\nContent-Type: application/octet-stream\n\nnot text\n"
        b'--b\nContent-Type: text/html; charset="x-bogus"\nContent-Transfer-Encoding: base64\n\n'
        b"PGI+aGk8L2I+\n"
        b"--b--\n"
    )
    assert list(ParsedMessage(raw).text_parts()) == ["аз\nline", "<b>hi</b>"]


def test_text_parts_of_a_plain_message_with_crlf_have_lf() -> None:
    parsed = ParsedMessage(b"Subject: x\r\n\r\nline one\r\nline two\r\n")
    assert list(parsed.text_parts()) == ["line one\nline two\n"]


@HYPOTHESIS
@given(st.binary(max_size=400))
def test_no_read_of_random_bytes_raises(raw: bytes) -> None:
    parsed = ParsedMessage(b"To: " + raw + b"\nFrom: " + raw + b"\nMessage-Id: " + raw + b"\n\n")
    assert isinstance(parsed.addresses("To"), list)
    assert parsed.from_address is None or "@" in parsed.from_address
    assert parsed.message_id is None or parsed.message_id.strip() == parsed.message_id
    assert all(isinstance(part, str) for part in parsed.text_parts())


# --- normalize_message_id -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@b>", "<a@b>"),
        ("<a@b> (comment)", "<a@b>"),
        ("  <a@b>  ", "<a@b>"),
        ("x <y@z> w", "<y@z>"),
        ("<a@b><c@d>", "<a@b>"),
        ("  bare-id@host  ", "bare-id@host"),
        (None, None),
        ("", None),
        ("   ", None),
        ("<>", None),
        ("(only a comment)", None),
        ("two words", None),
        ("<a b@c>", None),
        ("<", None),
    ],
)
def test_normalize_message_id(value: str | None, expected: str | None) -> None:
    assert normalize_message_id(value) == expected


# --- decode_text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "charset", "expected"),
    [
        ("café".encode("latin-1"), "iso-8859-1", "café"),
        ("аз".encode("koi8-r"), "koi8-r", "аз"),  # the declared charset wins over UTF-8
        (b"caf\xc3\xa9", None, "café"),
        (b"caf\xe9", None, "café"),
        (b"caf\xe9", "utf-8", "café"),  # declared UTF-8, but Latin-1 bytes
        (b"caf\xc3\xa9", "", "café"),
    ],
)
def test_decode_text_by_the_declared_charset_then_utf8_then_latin1(
    payload: bytes, charset: str | None, expected: str
) -> None:
    assert decode_text(payload, charset) == expected


@pytest.mark.parametrize(
    "charset",
    ["utf-8//TRANSLIT", "x-unknown", "uft-8", "base64", "zlib", "rot13", "\xff\xfe"],
)
def test_decode_text_with_a_bogus_charset_degrades(charset: str) -> None:
    assert decode_text(b"voil\xc3\xa0 x", charset) == "voilà x"


# --- parse_addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["team: A@b.test, c@d.test;"], ["a@b.test", "c@d.test"]),  # a group
        (["undisclosed-recipients:;"], []),  # an empty group
        (['"Doe, Jane" <Jane@X.test>, b@y.test'], ["jane@x.test", "b@y.test"]),
        (['"a,b"@c.test'], ['"a,b"@c.test']),
        (['"quoted local"@b.test'], ['"quoted local"@b.test']),
        (["a@b.test (comment), (x) c@d.test"], ["a@b.test", "c@d.test"]),
        (["Name <> a@b.test"], ["a@b.test"]),  # <> after a bare name
        (["joe <>, bob@b.test"], ["bob@b.test"]),
        (["bare name <>"], []),
        # An address written as the display name of an empty <> is no address.
        (["karin@example.com <>"], []),
        (["a@b.test, karin@example.com <>, c@d.test"], ["a@b.test", "c@d.test"]),
        (["<>"], []),
        (["a@b.test,,,c@d.test"], ["a@b.test", "c@d.test"]),
        (["a@b.test, <broken, c@d.test"], ["a@b.test", "c@d.test"]),
        (["x@y.test", "Z@W.test"], ["x@y.test", "z@w.test"]),
        (["a@[127.0.0.1]"], ["a@[127.0.0.1]"]),
    ],
)
def test_parse_addresses(values: list[str], expected: list[str]) -> None:
    assert parse_addresses(values) == expected


@pytest.mark.parametrize(
    "value", ["a@", "@b", "a b@c.test", '"unterminated <a@b.c', "a\x00b@c.test", "@@"]
)
def test_parse_addresses_skips_what_is_not_an_addr_spec(value: str) -> None:
    assert parse_addresses([value, "ok@d.test"]) == ["ok@d.test"]


@HYPOTHESIS
@given(st.lists(st.text(max_size=80), max_size=4))
def test_parse_addresses_never_raises(values: list[str]) -> None:
    for address in parse_addresses(values):
        local, at, domain = address.rpartition("@")
        assert at and local and domain and address == address.lower()


# --- what we add on top, and our own mail ----------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("a@B.Example.", "b.example"),
        ("a@[192.0.2.1]", "192.0.2.1"),
        ("no-at-sign", None),
        ("a@", None),
    ],
)
def test_domain_of(address: str, expected: str | None) -> None:
    assert domain_of(address) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"A: b\r\n\r\nc\r\n", b"\r\n"),  # LMTP
        (b"A: b\n\nc\n", b"\n"),  # a pipe, a Maildir
        (b"A: b\nc\r\n", b"\n"),  # the first line decides
        (b"no line end", b"\r\n"),
        (b"\nfirst line empty", b"\n"),
    ],
)
def test_line_ending(raw: bytes, expected: bytes) -> None:
    assert line_ending(raw) == expected


def test_added_headers_are_three_lines_in_the_message_line_ends() -> None:
    assert added_headers("s@x.example", "r@a.example", 1_700_000_000, b"\r\n") == (
        b"Return-Path: <s@x.example>\r\n"
        b"X-Original-To: r@a.example\r\n"
        b"X-Postoffice-Date: 1700000000\r\n"
    )
    assert added_headers("", "r@a.example", 5, b"\n") == (
        b"Return-Path: <>\nX-Original-To: r@a.example\nX-Postoffice-Date: 5\n"
    )


def test_added_headers_never_carry_a_line_break_or_nul_from_the_envelope() -> None:
    added = added_headers("s\r\n@x\x00.example", "r\nBcc: evil@x.example", 1, b"\r\n")
    assert added == (
        b"Return-Path: <s@x.example>\r\n"
        b"X-Original-To: rBcc: evil@x.example\r\n"
        b"X-Postoffice-Date: 1\r\n"
    )


def test_added_headers_keep_8bit_envelope_bytes() -> None:
    # The server reads undecodable envelope bytes as surrogates; they go back out as they came.
    added = added_headers("\udcff@x.example", "ü@a.example", 1, b"\n")
    assert added.splitlines()[:2] == [
        b"Return-Path: <\xff@x.example>",
        "X-Original-To: ü@a.example".encode(),
    ]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Subject: one\r\n  two\r\n\tthree", "one two three"),  # folded: one line
        (b"Subject: =?utf-8?q?a=0D=0ABcc:_evil@x.test?=", "a Bcc: evil@x.test"),
        (b"Subject: =?utf-8?q?a=00b?=", "ab"),
        (b"Subject: =?utf-8?q?Caf=C3=A9?=", "Café"),
        (b"Subject:   ", None),
        *((header, None) for header in RAISING_HEADERS),
    ],
)
def test_safe_header_is_one_clean_line_or_none(header: bytes, expected: str | None) -> None:
    name = header.decode().split(":")[0]
    assert safe_header(stored_message(header + b"\r\n\r\nbody\r\n"), name) == expected


def test_safe_header_of_an_absent_header_is_none() -> None:
    assert safe_header(stored_message(message()), "In-Reply-To") is None


# --- the body of a spooled message, read as it streams by ----------------------------


def _streamed(raw: bytes, piece: int) -> ParsedMessage:
    """The view deliver makes of a spooled message: the header block, then pieces of the whole."""
    head = ParsedMessage(raw)
    block = raw[: head.body_offset]
    return ParsedMessage(
        block, len(raw), lambda: (raw[i : i + piece] for i in range(0, len(raw), piece))
    )


def test_a_streamed_message_has_the_text_parts_of_the_whole_one_for_every_corpus_mail() -> None:
    """Over the real-world and Python's corpora: what a body rule reads does not depend on size."""
    files = shared_corpus() + python_corpus()
    if not files:
        pytest.skip("no corpus")
    for number, path in enumerate(files):
        raw = path.read_bytes()
        whole = ParsedMessage(raw)
        streamed = _streamed(raw, 1 + number % 7 * 997)  # pieces cut anywhere, CRLF split too
        assert len(streamed) == len(whole)
        assert streamed.headers == whole.headers, path
        assert list(streamed.text_parts()) == list(whole.text_parts()), path


def test_a_streamed_message_drops_what_is_not_text() -> None:
    raw = message_bytes(
        ['Content-Type: multipart/mixed; boundary="b"', "From: a@b.example"],
        b"--b\r\nContent-Type: image/png\r\n\r\n" + b"\x89PNG" * 1000 + b"\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nlast words\r\n--b--\r\n",
    )
    assert list(_streamed(raw, 100).text_parts()) == ["last words"]
