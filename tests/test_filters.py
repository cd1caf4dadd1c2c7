"""The five filter types, rule by rule, on messages as they arrive (bytes).

Each filter answers one message and one envelope recipient with a reason
(it matched) or None.  These tests write the filter lines exactly as an
administrator writes them in the ini file, and parse them the way the
configuration does.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postoffice.filters import Filter, parse_filter
from postoffice.message import ParsedMessage
from tests.helpers import message_bytes

RCPT = "rcpt@depot.example"
# repoze.postoffice 0.25's default: any address in To, Cc and the envelope.
# The tests of address parsing route on To with it.
HEADERS_025 = ";headers=To,Cc,X-Original-To"


def make(headers: str | bytes, body: str | bytes = "body\n", eol: bytes = b"\n") -> ParsedMessage:
    """A message from header lines (one a line) and a body, with the given line ending."""
    head = headers.encode("utf-8") if isinstance(headers, str) else headers
    return ParsedMessage(message_bytes(head.rstrip(b"\n").split(b"\n"), body, eol))


def one(line: str, base: Path | None = None) -> Filter:
    return parse_filter(line, base or Path("/nonexistent"))


def matches(line: str, message: ParsedMessage, rcpt: str = RCPT, base: Path | None = None) -> bool:
    reason = one(line, base)(message, rcpt)
    assert reason is None or (isinstance(reason, str) and reason)
    return reason is not None


# --- to_hostname -------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", True),
        ("EXAMPLE.com", True),
        ("a.example.com", False),
        ("badexample.com", False),
        ("example.com.evil.org", False),
        ("example.co", False),
    ],
)
def test_exact_host(domain: str, expected: bool) -> None:
    message = make(f"To: someone@{domain}")
    assert matches("to_hostname: example.com" + HEADERS_025, message) is expected


@pytest.mark.parametrize("wildcard", [".example.com", "*.example.com"])
@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", True),
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("A.Example.COM", True),
        # 0.25: the old code matched on a bare suffix.
        ("badexample.com", False),
        ("a.badexample.com", False),
        ("example.com.evil.org", False),
        ("xexample.com", False),
    ],
)
def test_subdomains_on_a_label_boundary_only(wildcard: str, domain: str, expected: bool) -> None:
    message = make(f"To: someone@{domain}")
    assert matches(f"to_hostname: {wildcard}" + HEADERS_025, message) is expected


def test_any_of_several_hosts() -> None:
    line = "to_hostname: app.customera.com app.aliasa.com"
    assert matches(line, make("To: x@other.org"), rcpt="x@app.aliasa.com")
    assert matches(line, make("To: x@other.org"), rcpt="x@app.customera.com")
    assert not matches(line, make("To: x@app.customera.com"), rcpt="x@customera.com")


def test_by_default_only_the_envelope_recipient_counts() -> None:
    """Each recipient reaches its own queue, whatever the sender wrote in To and Cc."""
    line = "to_hostname: .customera.example"
    to_a_cc_b = make("To: a1@app.customera.example\nCc: b1@x.customerb.example")
    assert matches(line, to_a_cc_b, rcpt="a1@app.customera.example")
    assert not matches(line, to_a_cc_b, rcpt="b1@x.customerb.example")
    reason = one(line)(to_a_cc_b, "a1@app.customera.example")
    assert (
        reason
        == "envelope recipient a1@app.customera.example matches to_hostname .customera.example"
    )


def test_headers_of_025_restore_routing_on_to_and_cc() -> None:
    line = "to_hostname: example.com" + HEADERS_025
    assert matches(line, make("To: a@other.org\nCc: b@example.com"))
    assert one(line)(make("To: a@other.org\nCc: b@example.com"), RCPT) == (
        "Cc address b@example.com matches to_hostname example.com"
    )
    assert not matches(line, make("From: b@example.com\nTo: a@other.org"))
    assert not matches(line, make("To: a@other.org\nReply-To: b@example.com"))
    assert not matches(line, make("To: a@other.org\nBcc: b@example.com"))


def test_every_to_header_counts_not_only_the_first() -> None:
    line = "to_hostname: example.com" + HEADERS_025
    assert matches(line, make("To: a@other.org\nTo: b@example.com"))


def test_x_original_to_is_the_envelope_recipient() -> None:
    line = "to_hostname: example.com"
    message = make("From: s@sender.org\nTo: list@lists.org")
    assert matches(line, message, rcpt="me@example.com")
    assert not matches(line, message, rcpt="me@other.org")


def test_a_forged_x_original_to_header_is_ignored() -> None:
    line = "to_hostname: example.com"
    forged = make("To: list@lists.org\nX-Original-To: victim@example.com")
    assert not matches(line, forged, rcpt="me@other.org")
    only_envelope = "to_hostname: example.com;headers=X-Original-To"
    assert not matches(only_envelope, forged, rcpt="me@other.org")
    assert matches(only_envelope, forged, rcpt="me@example.com")


def test_headers_attribute_replaces_the_defaults() -> None:
    line = "to_hostname: example.com;headers=From,Reply-To"
    assert not matches(line, make("To: a@example.com"), rcpt="r@example.com")
    assert matches(line, make("From: a@example.com\nTo: b@other.org"))
    assert matches(line, make("Reply-To: a@example.com\nTo: b@other.org"))


def test_headers_attribute_names_are_case_insensitive() -> None:
    line = "to_hostname: example.com;headers=delivered-to,x-original-to"
    assert matches(line, make("Delivered-To: a@example.com"))
    assert matches(line, make("To: b@other.org"), rcpt="r@example.com")


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ('"Doe, John" <j@other.org>, x@example.com', True),
        # The comma and the address live inside a quoted display name.
        ('"x@example.com, y" <a@other.org>', False),
        ("Team: a@other.org, b@example.com;", True),
        ("Team: a@other.org;, c@example.com", True),
        ("undisclosed-recipients:;", False),
        # A comment is not an address.
        ("a@other.org (ask b@example.com)", False),
        ("a@other.org (comment, with comma), b@example.com", True),
        ("=?utf-8?q?M=C3=BCller=2C_Hans?= <h@example.com>", True),
        ("h@example.com\n (folded comment)", True),
        ("a@other.org,\n b@example.com", True),
    ],
)
def test_rfc5322_address_lists(to: str, expected: bool) -> None:
    assert matches("to_hostname: example.com" + HEADERS_025, make(f"To: {to}")) is expected


@pytest.mark.parametrize(
    "to",
    [
        "bad@@x, <>, good@example.com",
        "<<<>>>, @@@, good@example.com",
        "good@example.com, (unclosed comment",
        "no-at-sign, good@example.com",
        "good@example.com <",
        "=?utf-8?b?!!!?= <good@example.com>",
        "Joe <joe@example.com> garbage",
    ],
)
def test_broken_addresses_are_skipped_not_fatal(to: str) -> None:
    assert matches("to_hostname: example.com" + HEADERS_025, make(f"To: {to}"))


def test_an_empty_angle_address_after_a_bare_address_is_skipped() -> None:
    line = "to_hostname: example.com" + HEADERS_025
    assert not matches(line, make("To: karin@example.com <>"), rcpt="r@other.org")
    assert matches(line, make("To: karin@example.com <>, k@example.com"), rcpt="r@other.org")


@pytest.mark.parametrize("to", ["@", "<>", ":;", '"', "(", "a@", "@example.com", ",,,", ""])
def test_only_broken_addresses_match_nothing(to: str) -> None:
    line = "to_hostname: .example.com" + HEADERS_025
    assert not matches(line, make(f"To: {to}"), rcpt="r@other.org")


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("bücher.example", "a@xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "a@bücher.example"),
        ("BÜCHER.example", "a@bücher.EXAMPLE"),
        (".bücher.example", "a@shop.xn--bcher-kva.example"),
        (".xn--bcher-kva.example", "a@shop.bücher.example"),
    ],
)
def test_idn_domains_compare_in_idna_form(host: str, address: str) -> None:
    # The header carries raw UTF-8 (RFC 6532); the ini file is UTF-8 too.
    assert matches(f"to_hostname: {host}" + HEADERS_025, make(f"To: {address}"))


def test_idn_envelope_recipient() -> None:
    message = make("To: list@lists.org")
    assert matches("to_hostname: xn--bcher-kva.example", message, rcpt="a@bücher.example")
    assert matches("to_hostname: bücher.example", message, rcpt="a@xn--bcher-kva.example")


def test_idn_does_not_loosen_the_label_boundary() -> None:
    line = "to_hostname: .bücher.example" + HEADERS_025
    assert not matches(line, make("To: a@xbücher.example"))


def test_domain_literal() -> None:
    assert matches("to_hostname: 192.0.2.1" + HEADERS_025, make("To: a@[192.0.2.1]"))


# --- header_regexp ---------------------------------------------------------------


def test_header_regexp_sees_name_colon_space_value() -> None:
    line = "header_regexp: Subject:.+[Pp]arty.+"
    assert matches(line, make("Subject: Big party tonight"))
    assert not matches(line, make("Subject: party"))  # nothing before "party"
    assert not matches(line, make("X-Subject: Big party tonight"))


def test_header_regexp_is_re_match_not_search_nor_fullmatch() -> None:
    assert not matches("header_regexp: Party", make("Subject: Party"))
    assert matches("header_regexp: .*Party", make("Subject: Party"))
    assert matches("header_regexp: Subject: Pa", make("Subject: Party time"))


def test_header_regexp_is_case_sensitive() -> None:
    assert not matches("header_regexp: Subject: party", make("Subject: Party"))
    assert not matches("header_regexp: Subject: x", make("SUBJECT: x"))
    assert matches("header_regexp: SUBJECT: x", make("SUBJECT: x"))
    assert matches("header_regexp: (?i)subject: PARTY", make("Subject: party"))


def test_header_regexp_value_is_unfolded_with_one_space() -> None:
    message = make("Subject:    a long\n\tsubject  \n   line")
    assert matches("header_regexp: Subject: a long subject line$", message)


def test_header_regexp_sees_rfc2047_decoded_values() -> None:
    message = make("Subject: =?utf-8?q?Party_=C3=A0_la_maison?=")
    assert matches("header_regexp: Subject: Party à la maison$", message)
    assert not matches("header_regexp: Subject: =\\?utf-8", message)


def test_rfc2047_base64_and_whitespace_between_words() -> None:
    word = base64.b64encode("Grüße".encode()).decode()
    message = make(f"Subject: =?UTF-8?B?{word}?=\n =?iso-8859-1?q?_und_caf=E9?= !")
    assert matches("header_regexp: Subject: Grüße und café !$", message)


def test_rfc2047_character_split_across_two_words() -> None:
    # Encoders cut long subjects between the bytes of one character.
    message = make("Subject: =?utf-8?q?caf=C3?= =?utf-8?q?=A9?=")
    assert matches("header_regexp: Subject: café$", message)


def test_rfc2047_mixed_with_raw_8bit_text() -> None:
    message = make("Subject: Grüße =?utf-8?q?caf=C3=A9?=")
    assert matches("header_regexp: Subject: Grüße café$", message)


def test_rfc2047_unknown_charset_and_broken_words_degrade() -> None:
    assert matches("header_regexp: Subject: abc$", make("Subject: =?x-unknown?q?abc?="))
    broken = make("Subject: =?utf-8?b?!!!?= rest")
    assert matches("header_regexp: Subject: =\\?utf-8\\?b\\?!!!\\?= rest$", broken)


def test_header_regexp_8bit_bytes_as_utf8() -> None:
    assert matches("header_regexp: Subject: Grüße$", make("Subject: Grüße".encode()))


def test_header_regexp_8bit_bytes_not_utf8_as_latin1() -> None:
    assert matches("header_regexp: Subject: Grüße$", make(b"Subject: Gr\xfc\xdfe"))


def test_header_regexp_sees_the_envelope_recipient_as_x_original_to() -> None:
    line = "header_regexp: X-Original-To: rcpt@depot\\.example$"
    assert matches(line, make("Subject: x"), rcpt="rcpt@depot.example")
    assert not matches(line, make("Subject: x"), rcpt="other@depot.example")


def test_header_regexp_never_sees_the_messages_own_x_original_to() -> None:
    message = make("X-Original-To: forged@victim.example\nSubject: x")
    assert not matches("header_regexp: X-Original-To: forged", message)
    assert matches("header_regexp: X-Original-To: rcpt@", message)
    assert not matches("header_regexp: x-original-to: forged", make("x-original-to: forged@v"))


def test_header_regexp_crlf_message() -> None:
    message = make("Subject: over lmtp", eol=b"\r\n")
    assert matches("header_regexp: Subject: over lmtp$", message)


# --- header_regexp_file ------------------------------------------------------------


def write_rules(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "rules.txt"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_header_regexp_file_any_line_matches(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "^Subject: .*viagra\n^X-Spam-Flag: YES\n")
    line = f"header_regexp_file: {path}"
    assert matches(line, make("X-Spam-Flag: YES"))
    assert matches(line, make("Subject: cheap viagra"))
    assert not matches(line, make("Subject: hello"))


@pytest.mark.parametrize("blank", ["\n", "   \n", "\t\n", " \t \n", "\r\n"])
def test_blank_lines_in_a_regexp_file_match_nothing(tmp_path: Path, blank: str) -> None:
    # 0.25: the old code compiled the blank line and it matched every message.
    path = write_rules(tmp_path, f"^X-Spam-Flag: YES\n{blank}^Subject: spam\n{blank}")
    assert not matches(f"header_regexp_file: {path}", make("Subject: hello\nTo: a@b.c"))


def test_spaces_at_either_end_of_a_line_are_part_of_the_regexp(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "Subject: x \n  Subject: y\n")
    line = f"header_regexp_file: {path}"
    assert not matches(line, make("Subject: x"))  # the trailing space is needed
    assert matches(line, make("Subject: x y"))
    assert not matches(line, make("Subject: y"))  # leading spaces never match a header start


def test_regexp_file_with_crlf_lines_and_a_bom(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "\ufeffSubject: a$\r\nSubject: b$\r\n".encode())
    line = f"header_regexp_file: {path}"
    assert matches(line, make("Subject: a"))
    assert matches(line, make("Subject: b"))


def test_regexp_file_is_utf8(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "^Subject: Grüße$\n")
    assert matches(f"header_regexp_file: {path}", make(b"Subject: Gr\xc3\xbc\xc3\x9fe"))


def test_regexp_file_is_read_once_at_start(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "^Subject: a$\n")
    compiled = one(f"header_regexp_file: {path}")
    path.write_text("\n")
    assert compiled(make("Subject: a"), RCPT) is not None


def test_empty_regexp_file_matches_nothing(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "\n\n  \n")
    assert not matches(f"header_regexp_file: {path}", make("Subject: anything"))
    assert not matches(f"body_regexp_file: {path}", make("Subject: x", "anything\n"))


# --- body_regexp --------------------------------------------------------------------


def multipart(*parts: tuple[str, bytes], boundary: str = "BOUNDARY") -> bytes:
    """A multipart/mixed message; each part is (its header lines, its body bytes)."""
    out = [
        b"From: a@b.example",
        b"MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"'.encode(),
        b"",
        b"preamble",
    ]
    for headers, body in parts:
        out += [f"--{boundary}".encode(), headers.encode(), b"", body]
    out += [f"--{boundary}--".encode(), b""]
    return b"\n".join(out)


def test_body_regexp_is_search_not_match() -> None:
    message = make("Subject: x", "Hello,\nplease unsubscribe me now\n")
    assert matches("body_regexp: unsubscribe", message)


def test_body_regexp_is_multiline() -> None:
    message = make("Subject: x", "Hello,\nunsubscribe\nthanks\n")
    assert matches("body_regexp: ^unsubscribe$", message)
    assert not matches("body_regexp: ^Hello,$\\Z", message)


def test_body_regexp_does_not_read_headers() -> None:
    assert not matches("body_regexp: secret", make("Subject: secret", "nothing here\n"))


def test_body_regexp_only_text_parts() -> None:
    raw = multipart(
        ("Content-Type: text/plain", b"just words"),
        ("Content-Type: application/octet-stream", b"secret in an attachment"),
        (
            "Content-Type: image/png\nContent-Transfer-Encoding: base64",
            base64.b64encode(b"secret too"),
        ),
    )
    assert not matches("body_regexp: secret", ParsedMessage(raw))
    assert matches("body_regexp: just words", ParsedMessage(raw))


def test_body_regexp_html_part_is_text() -> None:
    raw = multipart(
        ("Content-Type: text/plain", b"plain"),
        ("Content-Type: text/html; charset=utf-8", b"<p>secret</p>"),
    )
    assert matches("body_regexp: <p>secret", ParsedMessage(raw))


def test_body_regexp_decodes_transfer_encodings() -> None:
    raw = multipart(
        (
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64",
            base64.b64encode("prix spécial".encode()),
        ),
        (
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable",
            b"tr=C3=A8s =\nbien",
        ),
    )
    message = ParsedMessage(raw)
    assert matches("body_regexp: prix spécial", message)
    assert matches("body_regexp: très bien", message)


@pytest.mark.parametrize(
    ("charset", "payload"),
    [
        ("iso-8859-1", "café crème".encode("latin-1")),
        ("koi8-r", "café crème".encode()),  # wrong label, but decodes: no match
        ("windows-1252", "café crème".encode("cp1252")),
        ("utf-8", "café crème".encode()),
        ("UTF-8", "café crème".encode()),
    ],
)
def test_body_regexp_declared_charset(charset: str, payload: bytes) -> None:
    message = ParsedMessage(
        b"Content-Type: text/plain; charset=" + charset.encode() + b"\n\n" + payload
    )
    assert matches("body_regexp: café crème", message) is (charset != "koi8-r")


def test_body_regexp_declared_charset_wins_over_utf8() -> None:
    # These bytes are valid UTF-8 ("Ð¹" read as Latin-1), yet KOI8-R says "аз".
    payload = "аз".encode("koi8-r")
    message = ParsedMessage(b"Content-Type: text/plain; charset=koi8-r\n\n" + payload)
    assert matches("body_regexp: аз", message)


def test_body_regexp_no_charset_utf8_then_latin1() -> None:
    assert matches("body_regexp: café", make("Subject: x", "café\n".encode()))
    assert matches("body_regexp: café", make("Subject: x", b"caf\xe9\n"))


def test_body_regexp_declared_utf8_but_latin1_bytes_falls_back() -> None:
    message = ParsedMessage(b"Content-Type: text/plain; charset=utf-8\n\ncaf\xe9\n")
    assert matches("body_regexp: café", message)


@pytest.mark.parametrize(
    "charset",
    ["utf-8//TRANSLIT", "x-unknown", "uft-8", "unicode-1-1-utf-7", "base64", "zlib", "idna", ""],
)
def test_body_regexp_bogus_charsets_degrade(charset: str) -> None:
    raw = b'Content-Type: text/plain; charset="' + charset.encode() + b'"\n\nvoil\xc3\xa0 spam\n'
    message = ParsedMessage(raw)
    assert matches("body_regexp: spam", message)
    if charset != "idna":
        assert matches("body_regexp: voilà", message)


def test_body_regexp_in_a_forwarded_message_part() -> None:
    inner = b"From: x@y\nContent-Type: text/plain\n\nforwarded secret\n"
    raw = multipart(("Content-Type: message/rfc822", inner))
    assert matches("body_regexp: forwarded secret", ParsedMessage(raw))


def test_body_regexp_file(tmp_path: Path) -> None:
    path = write_rules(tmp_path, "^buy now$\n\n   \n(?i)free money\n")
    line = f"body_regexp_file: {path}"
    assert matches(line, make("Subject: x", "hi\nbuy now\n"))
    assert matches(line, make("Subject: x", "FREE MONEY\n"))
    assert not matches(line, make("Subject: x", "hello\n"))


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"])
def test_body_regexp_dollar_works_whatever_the_line_ends(eol: bytes) -> None:
    # Over LMTP mail arrives with CRLF; `$` must still end a line before the CR.
    message = make("Subject: x", "line one\nunsubscribe\nend", eol=eol)
    assert matches("body_regexp: ^unsubscribe$", message)
    multi = multipart(("Content-Type: text/plain", b"a\r\nunsubscribe\r\nb"))
    assert matches("body_regexp: ^unsubscribe$", ParsedMessage(multi.replace(b"\n", eol)))


# --- filters never raise on mail ---------------------------------------------------

HOSTILE_HEADERS = [
    b'To: "\\',
    b"To: =?utf-8?q?=?=",
    b"To: a@b.c (((((((((",
    b"To: <@route:a@b.c>",
    b"To: " + b"a," * 5000,
    b"To: \x00\x01\x02@\xff\xfe",
    b"Subject: =?utf-8?b?" + b"A" * 10001 + b"?=",
    b"Subject: =?" + b"\xff" * 20 + b"?q?x?=",
    b"Content-Type: text/plain; charset*=''\n",
    b"Content-Type: multipart/mixed; boundary=",
    b'Content-Type: text/plain; charset="\xff\xfe"',
    b"Content-Transfer-Encoding: base64",
]

ALL_FILTERS = [
    "to_hostname: .example.com",
    "to_hostname: example.com;headers=From,To,Cc,Subject",
    "header_regexp: .*x",
    "body_regexp: x",
]


@pytest.mark.parametrize("header", HOSTILE_HEADERS)
def test_filters_never_raise_on_hostile_headers(header: bytes) -> None:
    message = ParsedMessage(header + b"\n\nbody x\n=ZZ\n")
    for line in ALL_FILTERS:
        one(line)(message, RCPT)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.text(max_size=40))
def test_filters_never_raise_on_random_bytes(raw: bytes, rcpt: str) -> None:
    message = ParsedMessage(b"To: " + raw + b"\nContent-Type: text/plain\n\n" + raw)
    for line in ALL_FILTERS:
        one(line)(message, rcpt)


def test_a_huge_address_list_is_parsed_in_linear_time() -> None:
    # 20,000 addresses (about 400 KB): a quadratic parser takes many seconds per
    # filter and recipient, stalling every delivery behind this one.
    to = ", ".join(f"user{n}@host{n}.example" for n in range(20_000))
    message = make(f"To: {to}\nCc: {to}")
    started = time.perf_counter()
    for rcpt in ("a@x.example", "b@y.example", "c@z.example"):
        assert matches("to_hostname: host19999.example" + HEADERS_025, message, rcpt=rcpt)
        assert not matches("to_hostname: .nowhere.example" + HEADERS_025, message, rcpt=rcpt)
    assert time.perf_counter() - started < 3.0


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_a_message_starting_with_an_empty_line_has_no_headers(eol: bytes) -> None:
    # Everything after the first empty line is body, even text that looks like a header.
    message = ParsedMessage(eol + b"Subject: not a header" + eol + eol + b"body" + eol)
    assert not matches("header_regexp: Subject:", message)
    assert matches("body_regexp: ^Subject: not a header$", message)
