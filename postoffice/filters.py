"""The five filter types of the ini file: data plus a pure predicate each.

A filter is called with one message and one envelope recipient and answers
a short reason (it matched) or None.  Filters never raise on mail: the
message view they read from (:class:`postoffice.message.ParsedMessage`)
already turns broken input into "no value".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from postoffice.message import ParsedMessage, domain_of

# By default a queue is chosen by the envelope recipient alone: each recipient
# of a message reaches its own application, whatever the sender wrote in To
# and Cc.  ``;headers=To,Cc,X-Original-To`` is repoze.postoffice 0.25's default.
DEFAULT_HOSTNAME_HEADERS = ("X-Original-To",)
ENVELOPE_HEADER = "x-original-to"
# An inline comment on a to_hostname line: ` #...`, or ` ;...` unless that is an
# attribute (` ;headers=To`), which is refused or used, never silently dropped.
_INLINE_COMMENT = re.compile(r"\s+(?:#|;(?!\s*[\w-]+\s*=)).*$", re.DOTALL)


class Filter(Protocol):
    """What the decision calls: the reason it matched (for the reply and the log), or None."""

    def __call__(self, message: ParsedMessage, recipient: str) -> str | None: ...


@functools.lru_cache(maxsize=4096)
def idna(domain: str) -> str:
    """A domain in the form two spellings of it compare equal: lower-case IDNA."""
    domain = domain.strip().strip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


@dataclass(frozen=True)
class ToHostname:
    """The domain of an address in the chosen headers is one of ``hosts``.

    A host written ``.example.com`` or ``*.example.com`` also matches its
    subdomains, on a label boundary only (never ``badexample.com``).
    ``X-Original-To`` means the envelope recipient, which a sender cannot forge.
    """

    hosts: tuple[str, ...]
    wildcards: tuple[str, ...]
    headers: tuple[str, ...] = DEFAULT_HOSTNAME_HEADERS

    def matching_host(self, domain: str) -> str | None:
        """The host as written in the filter (``.example.com`` for a wildcard), or None."""
        domain = idna(domain)
        if domain in self.hosts:
            return domain
        for wildcard in self.wildcards:
            if domain == wildcard or domain.endswith("." + wildcard):
                return "." + wildcard
        return None

    def __call__(self, message: ParsedMessage, recipient: str) -> str | None:
        for header in self.headers:
            if header.lower() == ENVELOPE_HEADER:
                addresses = [recipient.lower()]
                what = "envelope recipient"
            else:
                addresses = message.addresses(header)
                what = f"{header} address"
            for address in addresses:
                domain = domain_of(address)
                host = self.matching_host(domain) if domain else None
                if host is not None:
                    return f"{what} {address} matches to_hostname {host}"
        return None


@dataclass(frozen=True)
class HeaderRegexp:
    """``re.match`` against ``Name: value`` for every header, decoded.

    The envelope recipient is shown as ``X-Original-To: rcpt``; the message's
    own ``X-Original-To`` is never shown (anyone could have written it).
    """

    patterns: tuple[re.Pattern[str], ...]
    origin: str

    def __call__(self, message: ParsedMessage, recipient: str) -> str | None:
        lines = [f"X-Original-To: {recipient}"]
        lines.extend(
            f"{name}: {value}" for name, value in message.headers if name.lower() != ENVELOPE_HEADER
        )
        for pattern in self.patterns:
            for line in lines:
                if pattern.match(line):
                    return f"header matches {pattern.pattern!r} ({self.origin})"
        return None


@dataclass(frozen=True)
class BodyRegexp:
    """``re.search`` (MULTILINE) over each ``text/*`` part, decoded."""

    patterns: tuple[re.Pattern[str], ...]
    origin: str

    def __call__(self, message: ParsedMessage, recipient: str) -> str | None:
        for text in message.text_parts():
            for pattern in self.patterns:
                if pattern.search(text):
                    return f"body matches {pattern.pattern!r} ({self.origin})"
        return None


def _compile(pattern: str, flags: int, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"{where}: regexp {pattern!r} does not compile: {exc}") from None


def _read_patterns(path: Path, flags: int) -> tuple[re.Pattern[str], ...]:
    """One regexp a line; blank lines are skipped (an empty regexp matches every message)."""
    try:
        # utf-8-sig: a BOM left by a Windows editor must not become part of line 1.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read regexp file {path}: {exc}") from None
    patterns = []
    # Only LF (or CRLF) ends a line: str.splitlines() would also split on
    # form feeds and Unicode separators, which a regexp may contain.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        patterns.append(_compile(line, flags, f"{path} line {number}"))
    return tuple(patterns)


def _to_hostname(argument: str, base: Path) -> ToHostname:
    argument = _INLINE_COMMENT.sub("", argument)
    spec, _, attrs = argument.partition(";")
    headers: tuple[str, ...] = DEFAULT_HOSTNAME_HEADERS
    if attrs:
        for attr in attrs.split(";"):
            key, sep, value = attr.partition("=")
            if key.strip().lower() != "headers" or not sep:
                raise ValueError(f"unknown to_hostname attribute {attr.strip()!r} (only headers=)")
            headers = tuple(h.strip() for h in value.split(",") if h.strip())
            if not headers:
                raise ValueError("headers= names no header")
    hosts: list[str] = []
    wildcards: list[str] = []
    for host in spec.split():
        wildcard = host.startswith((".", "*."))
        name = idna(host[2:] if host.startswith("*.") else host.lstrip("."))
        if not name or "@" in name or "*" in name:
            raise ValueError(f"to_hostname: {host!r} is not a host name")
        (wildcards if wildcard else hosts).append(name)
    if not hosts and not wildcards:
        raise ValueError("to_hostname names no host")
    return ToHostname(hosts=tuple(hosts), wildcards=tuple(wildcards), headers=headers)


def _header_regexp(argument: str, base: Path) -> HeaderRegexp:
    return HeaderRegexp((_compile(argument, 0, "header_regexp"),), f"header_regexp: {argument}")


def _header_regexp_file(argument: str, base: Path) -> HeaderRegexp:
    path = base / argument.strip()
    return HeaderRegexp(_read_patterns(path, 0), f"header_regexp_file: {path}")


def _body_regexp(argument: str, base: Path) -> BodyRegexp:
    pattern = _compile(argument, re.MULTILINE, "body_regexp")
    return BodyRegexp((pattern,), f"body_regexp: {argument}")


def _body_regexp_file(argument: str, base: Path) -> BodyRegexp:
    path = base / argument.strip()
    return BodyRegexp(_read_patterns(path, re.MULTILINE), f"body_regexp_file: {path}")


_PARSERS: dict[str, Callable[[str, Path], Filter]] = {
    "to_hostname": _to_hostname,
    "header_regexp": _header_regexp,
    "header_regexp_file": _header_regexp_file,
    "body_regexp": _body_regexp,
    "body_regexp_file": _body_regexp_file,
}


def parse_filter(line: str, base: Path) -> Filter:
    """One ``type: argument`` line of a ``filters`` option; ValueError says what is wrong.

    Relative file paths are relative to the configuration file's folder.
    """
    kind, sep, argument = line.partition(":")
    kind = kind.strip()
    if not sep or kind not in _PARSERS:
        known = ", ".join(_PARSERS)
        raise ValueError(f"unknown filter {kind!r} (known: {known})")
    argument = argument.strip()
    if not argument:
        raise ValueError(f"{kind} needs an argument")
    return _PARSERS[kind](argument, base)


def first_match(filters: Iterable[Filter], message: ParsedMessage, recipient: str) -> str | None:
    """The reason of the first filter that matches, for reject filters."""
    for one in filters:
        reason = one(message, recipient)
        if reason is not None:
            return reason
    return None


def all_match(
    filters: tuple[Filter, ...], message: ParsedMessage, recipient: str
) -> tuple[str, ...] | None:
    """Why a queue wins (each filter's reason), or None.

    A queue wins when it has filters and every one matches; with none it
    matches nothing.
    """
    if not filters:
        return None
    reasons = []
    for one in filters:
        reason = one(message, recipient)
        if reason is None:
            return None
        reasons.append(reason)
    return tuple(reasons)
