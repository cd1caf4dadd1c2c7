"""The ini file: what an administrator writes, and every way it can be wrong.

A bad file must be refused at start with one line that names the file, the
section and the option (and the line, for regexp files), so the person
editing it can fix it without reading a traceback.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from postoffice import config
from postoffice.config import ConfigError, Settings, find_config, load, parse_size
from postoffice.filters import BodyRegexp, HeaderRegexp, ToHostname
from postoffice.message import ParsedMessage

MINIMAL = """\
[post office]
zodb_uri = file://%(here)s/var/Data.fs
"""

FULL = """\
[post office]
zodb_uri = file://%(here)s/var/Data.fs?blobstorage_dir=%(here)s/var/blobs
zodb_path = /apps/postoffice     # optional, default /postoffice
ooo_loop_frequency = 60          ; msgs per minute from one sender
ooo_loop_headers = To,Subject    # optional discriminator headers
ooo_throttle_period = 600        # seconds
max_message_size = 50m           # bytes
reject_filters =
    header_regexp_file: %(here)s/reject_headers.txt
    to_hostname: .partycentral.com   # no parties
maildir = %(here)s/incoming/Maildir   # only for import-maildir

[lmtp]
listen = unix:%(here)s/var/lmtp.sock  # or 127.0.0.1:8024
socket_mode = 0660
max_sessions = 16

[queue:Zeta]
filters =
    to_hostname: zeta.example

[queue:Customer A]
filters =
    to_hostname: app.customera.com app.aliasa.com ; two names

[queue:Alpha]
filters =
    to_hostname: .customerb.com
    header_regexp: Subject:.+[Pp]arty.+ #1
"""


def write(folder: Path, text: str, name: str = "postoffice.ini") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def refused(folder: Path, text: str) -> str:
    """Load ``text`` and return the one-line error it must raise."""
    path = write(folder, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    assert str(path) in message, f"error does not name the file: {message!r}"
    return message


@pytest.fixture
def full(tmp_path: Path) -> Settings:
    write(tmp_path, "Subject: .*win a prize\n", "reject_headers.txt")
    return load(write(tmp_path, FULL))


# --- the format ------------------------------------------------------------


def test_queues_are_tried_in_file_order_not_sorted(full: Settings) -> None:
    # configparser keeps sections in order; the old code had to rebuild it.
    assert full.queue_names == ("Zeta", "Customer A", "Alpha")


def test_here_is_the_folder_of_the_config_file(tmp_path: Path, full: Settings) -> None:
    here = str(tmp_path.resolve())
    assert full.zodb_uri == f"file://{here}/var/Data.fs?blobstorage_dir={here}/var/blobs"
    assert full.maildir == tmp_path.resolve() / "incoming" / "Maildir"
    assert full.lmtp.listen == f"unix:{here}/var/lmtp.sock"
    reject = full.reject_filters[0]
    assert isinstance(reject, HeaderRegexp)
    assert reject.origin == f"header_regexp_file: {here}/reject_headers.txt"


def test_here_works_when_the_file_is_named_relatively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    settings = load("postoffice.ini")
    assert settings.zodb_uri == f"file://{tmp_path.resolve()}/var/Data.fs"


def test_other_percent_signs_are_left_as_written(tmp_path: Path) -> None:
    # Regexps are full of % and $; configparser's interpolation would refuse them.
    text = MINIMAL + "[queue:A]\nfilters =\n    header_regexp: Subject: 100% ${x} %%done\n"
    settings = load(write(tmp_path, text))
    (only,) = settings.queues[0].filters
    assert isinstance(only, HeaderRegexp)
    assert only.patterns[0].pattern == "Subject: 100% ${x} %done"


def test_inline_comments_on_scalars(full: Settings) -> None:
    assert full.zodb_path == "/apps/postoffice"
    assert full.ooo_loop_frequency == 60.0
    assert full.ooo_loop_headers == ("To", "Subject")
    assert full.ooo_throttle_period == 600
    assert full.max_message_size == 50 * 1024 * 1024
    assert full.lmtp.socket_mode == 0o660
    assert full.lmtp.max_sessions == 16


def test_inline_comments_on_to_hostname_lines(full: Settings) -> None:
    customer_a = full.queues[1].filters[0]
    assert isinstance(customer_a, ToHostname)
    assert customer_a.hosts == ("app.customera.com", "app.aliasa.com")
    party = full.reject_filters[1]
    assert isinstance(party, ToHostname)
    assert party.wildcards == ("partycentral.com",)


def test_no_inline_comment_inside_a_regexp_line(full: Settings) -> None:
    # " #1" is part of the regexp: `#` is a legal regexp character.
    regexp = full.queues[2].filters[1]
    assert isinstance(regexp, HeaderRegexp)
    assert regexp.patterns[0].pattern == "Subject:.+[Pp]arty.+ #1"


def test_semicolon_attribute_after_a_space_is_not_a_comment(tmp_path: Path) -> None:
    text = MINIMAL + "[queue:A]\nfilters =\n    to_hostname: a.example ;headers=Cc # c\n"
    (rule,) = load(write(tmp_path, text)).queues[0].filters
    assert isinstance(rule, ToHostname)
    assert rule.headers == ("Cc",)


def test_defaults_of_an_old_minimal_file(tmp_path: Path) -> None:
    settings = load(write(tmp_path, MINIMAL))
    assert settings.zodb_path == "/postoffice"
    assert settings.ooo_loop_frequency == 0
    assert settings.ooo_loop_headers == ()
    assert settings.ooo_throttle_period == 300
    assert settings.max_message_size is None
    assert settings.reject_filters == ()
    assert settings.queues == ()
    assert settings.lmtp.listen == f"unix:{tmp_path.resolve()}/var/lmtp.sock"
    assert settings.lmtp.commit_batch == 64
    assert settings.lmtp.commit_delay == 0.002


def test_commit_delay_is_read_in_seconds(tmp_path: Path) -> None:
    settings = load(write(tmp_path, MINIMAL + "[lmtp]\ncommit_delay = 0.0005\n"))
    assert settings.lmtp.commit_delay == 0.0005
    assert load(write(tmp_path, MINIMAL + "[lmtp]\ncommit_delay = 0\n")).lmtp.commit_delay == 0


def test_a_queue_without_filters_is_kept_and_matches_nothing(tmp_path: Path) -> None:
    settings = load(write(tmp_path, MINIMAL + "[queue:Empty]\n"))
    assert settings.queue_names == ("Empty",)
    assert settings.queues[0].filters == ()


def test_all_five_filter_types_are_read(tmp_path: Path) -> None:
    write(tmp_path, "^Subject: a\n", "h.txt")
    write(tmp_path, "^b$\n", "b.txt")
    text = MINIMAL + (
        "[queue:A]\nfilters =\n"
        "    to_hostname: a.example\n"
        "    header_regexp: ^From: x\n"
        "    header_regexp_file: h.txt\n"
        "    body_regexp: ^hello\n"
        "    body_regexp_file: b.txt\n"
    )
    kinds = [type(f) for f in load(write(tmp_path, text)).queues[0].filters]
    assert kinds == [ToHostname, HeaderRegexp, HeaderRegexp, BodyRegexp, BodyRegexp]


def test_relative_regexp_file_is_relative_to_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "etc", "^X-Spam: yes\n", "spam.txt")
    path = write(tmp_path / "etc", MINIMAL + "reject_filters =\n    header_regexp_file: spam.txt\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    (spam,) = load(path).reject_filters
    assert spam(ParsedMessage(b"X-Spam: yes\n\nbody\n"), "r@x") is not None


def test_utf8_file_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    text = MINIMAL + "[queue:Bücher]\nfilters =\n    to_hostname: bücher.example\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    settings = load(path)
    assert settings.queue_names == ("Bücher",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1234", 1234),
        ("10k", 10 * 1024),
        ("10K", 10 * 1024),
        ("10kb", 10 * 1024),
        ("3m", 3 * 1024**2),
        ("3MB", 3 * 1024**2),
        ("2g", 2 * 1024**3),
        ("2gb", 2 * 1024**3),
        (" 7 m ", 7 * 1024**2),
    ],
)
def test_sizes_with_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("suffix", ["k", "kb", "m", "mb", "g", "gb"])
def test_size_suffix_in_the_file(tmp_path: Path, suffix: str) -> None:
    settings = load(write(tmp_path, MINIMAL + f"max_message_size = 2{suffix}  # limit\n"))
    factor = {"k": 1024, "m": 1024**2, "g": 1024**3}[suffix[0]]
    assert settings.max_message_size == 2 * factor


def test_settings_are_frozen(full: Settings) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.max_message_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.lmtp.listen = "unix:/elsewhere"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.queues[0].name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        full.queues[0].filters[0].hosts = ()  # type: ignore[attr-defined,misc]
    assert isinstance(full.queues, tuple)
    assert isinstance(full.queues[0].filters, tuple)


# --- where the file is found -------------------------------------------------


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Every place of the search order, none holding a file yet; cwd is ``work``."""
    work = tmp_path / "work"
    prefix = tmp_path / "venv"
    (prefix / "bin").mkdir(parents=True)
    (work / "etc").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("POSTOFFICE_CONFIG", raising=False)
    monkeypatch.setattr(sys, "argv", [str(prefix / "bin" / "postoffice")])
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "system" / "postoffice.ini")
    return {
        "explicit": tmp_path / "explicit.ini",
        "env": tmp_path / "env.ini",
        "cwd": work / "postoffice.ini",
        "cwd_etc": work / "etc" / "postoffice.ini",
        "prefix": prefix / "etc" / "postoffice.ini",
        "system": tmp_path / "system" / "postoffice.ini",
    }


ORDER = ["explicit", "env", "cwd", "cwd_etc", "prefix", "system"]


@pytest.mark.parametrize("winner", ORDER)
def test_search_order(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    # Every place from the winner down holds a file; the winner must be chosen.
    for name in ORDER[ORDER.index(winner) :]:
        write(places[name].parent, MINIMAL, places[name].name)
    if ORDER.index(winner) <= ORDER.index("env"):
        monkeypatch.setenv("POSTOFFICE_CONFIG", str(places["env"]))
    explicit = places["explicit"] if winner == "explicit" else None
    found = find_config(explicit)
    assert found.resolve() == places[winner].resolve()
    assert load(found).zodb_uri.startswith("file://")


def test_nothing_found_names_every_place_tried(places: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as info:
        find_config(None)
    message = str(info.value)
    assert "-C" in message
    assert "etc/postoffice.ini" in message
    assert str(places["prefix"].resolve()) in message
    assert str(places["system"]) in message


def test_explicit_file_that_is_missing_is_an_error_not_a_fallback(
    places: dict[str, Path],
) -> None:
    write(places["cwd"].parent, MINIMAL, places["cwd"].name)
    with pytest.raises(ConfigError, match=r"explicit\.ini"):
        find_config(places["explicit"])


def test_env_file_that_is_missing_is_an_error_not_a_fallback(
    places: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(places["cwd"].parent, MINIMAL, places["cwd"].name)
    monkeypatch.setenv("POSTOFFICE_CONFIG", str(places["env"]))
    with pytest.raises(ConfigError, match=r"env\.ini.*POSTOFFICE_CONFIG"):
        find_config(None)


# --- every bad input: one line naming file, section, option ------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.ini"):
        load(tmp_path / "nope.ini")


def test_not_an_ini_file(tmp_path: Path) -> None:
    message = refused(tmp_path, "zodb_uri = file:///x\n")
    assert "section" in message.lower()


def test_missing_main_section(tmp_path: Path) -> None:
    message = refused(tmp_path, "[queue:A]\nfilters =\n    to_hostname: a.example\n")
    assert "[post office]" in message


def test_missing_zodb_uri(tmp_path: Path) -> None:
    message = refused(tmp_path, "[post office]\nzodb_path = /po\n")
    assert "[post office] zodb_uri" in message
    assert "missing" in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("ooo_loop_frequency", "often"),
        ("ooo_loop_frequency", "nan"),
        ("ooo_loop_frequency", "inf"),
        ("ooo_loop_frequency", "-1"),
        ("ooo_throttle_period", "5 minutes"),
        ("ooo_throttle_period", "1.5"),
        ("dead_letter_max", "lots"),
    ],
)
def test_bad_number(tmp_path: Path, option: str, value: str) -> None:
    message = refused(tmp_path, MINIMAL + f"{option} = {value}\n")
    assert f"[post office] {option}" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_sessions", "many"),
        ("max_sessions", "0"),
        ("socket_mode", "rw-rw----"),
        ("commit_delay", "-0.001"),
        ("commit_delay", "2"),
        ("commit_delay", "soon"),
    ],
)
def test_bad_number_in_lmtp(tmp_path: Path, option: str, value: str) -> None:
    message = refused(tmp_path, MINIMAL + f"[lmtp]\n{option} = {value}\n")
    assert f"[lmtp] {option}" in message


@pytest.mark.parametrize("value", ["50x", "50 mbytes", "m50", "1.5m", "k"])
def test_bad_size_suffix(tmp_path: Path, value: str) -> None:
    message = refused(tmp_path, MINIMAL + f"max_message_size = {value}\n")
    assert "[post office] max_message_size" in message
    assert "size" in message


def test_unknown_filter_type(tmp_path: Path) -> None:
    text = MINIMAL + "[queue:A]\nfilters =\n    to_hostname: a.example\n    to_host: b.example\n"
    message = refused(tmp_path, text)
    assert "[queue:A] filters" in message
    assert "'to_host'" in message
    assert "line 6" in message


def test_unknown_filter_type_in_reject_filters(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "reject_filters =\n    subject_regexp: x\n")
    assert "[post office] reject_filters" in message
    assert "'subject_regexp'" in message


@pytest.mark.parametrize("attr", [";header=To", ";headers=To;ports=25", " ;via=To", ";headers"])
def test_unknown_to_hostname_attribute(tmp_path: Path, attr: str) -> None:
    text = MINIMAL + f"[queue:A]\nfilters =\n    to_hostname: a.example{attr}\n"
    message = refused(tmp_path, text)
    assert "[queue:A] filters" in message
    assert "attribute" in message


@pytest.mark.parametrize("host", [".", "*.", "a@b.example"])
def test_a_host_that_is_not_a_host_name(tmp_path: Path, host: str) -> None:
    message = refused(tmp_path, MINIMAL + f"[queue:A]\nfilters =\n    to_hostname: {host}\n")
    assert "[queue:A] filters" in message


def test_unknown_option_in_a_queue_section(tmp_path: Path) -> None:
    text = MINIMAL + "[queue:A]\nfilters =\n    to_hostname: a.example\nfilter = x\n"
    message = refused(tmp_path, text)
    assert "[queue:A] filter:" in message
    assert "unknown option" in message


def test_unknown_option_in_the_main_section(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "ooo_loop_freqency = 3\n")
    assert "[post office] ooo_loop_freqency" in message


def test_unknown_section(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "[Customer A]\nfilters =\n    to_hostname: a\n")
    assert "[Customer A]" in message


def test_two_queues_with_one_name(tmp_path: Path) -> None:
    text = MINIMAL + "[queue:A]\n[queue: A]\n"
    message = refused(tmp_path, text)
    assert "[queue: A]" in message


def test_duplicate_option(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "zodb_path = /a\nzodb_path = /b\n")
    assert "zodb_path" in message


def test_inline_regexp_that_does_not_compile(tmp_path: Path) -> None:
    text = MINIMAL + "[queue:B]\nfilters =\n    to_hostname: b.example\n    header_regexp: (\n"
    message = refused(tmp_path, text)
    assert "[queue:B] filters" in message
    assert "line 6" in message
    assert "does not compile" in message
    assert "'('" in message


def test_inline_body_regexp_that_does_not_compile(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "reject_filters = body_regexp: [a-\n")
    assert "[post office] reject_filters" in message
    assert "line 3" in message
    assert "does not compile" in message


@pytest.mark.parametrize("kind", ["header_regexp_file", "body_regexp_file"])
def test_regexp_file_that_does_not_compile_names_its_line(tmp_path: Path, kind: str) -> None:
    rules = write(tmp_path / "rules", "^Subject: fine\n\n   \nok\n^X-Bad: (unclosed\n", "r.txt")
    text = MINIMAL + f"[queue:B]\nfilters =\n    {kind}: %(here)s/rules/r.txt\n"
    message = refused(tmp_path, text)
    assert "[queue:B] filters" in message
    assert f"{rules} line 5" in message
    assert "(unclosed" in message


@pytest.mark.parametrize("kind", ["header_regexp_file", "body_regexp_file"])
def test_unreadable_regexp_file(tmp_path: Path, kind: str) -> None:
    message = refused(tmp_path, MINIMAL + f"[queue:B]\nfilters =\n    {kind}: missing.txt\n")
    assert "[queue:B] filters" in message
    assert str(tmp_path.resolve() / "missing.txt") in message
    assert "cannot read" in message


def test_regexp_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes(b"^Subject: caf\xe9\n")
    message = refused(tmp_path, MINIMAL + "reject_filters = header_regexp_file: latin.txt\n")
    assert "latin.txt" in message
    assert "cannot read" in message


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "postoffice.ini"
    path.write_bytes(MINIMAL.encode() + b"[queue:caf\xe9]\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_zodb_path_that_names_no_folder(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "zodb_path = /\n")
    assert "[post office] zodb_path" in message


def test_bad_listen_address(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "[lmtp]\nlisten = localhost\n")
    assert "[lmtp] listen" in message


def test_errors_have_no_traceback_text(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "max_message_size = lots\n")
    assert not re.search(r"Traceback|File \"", message)


# --- discard instead of refuse -----------------------------------------------------------


def test_discard_is_off_by_default_every_refusal_stays_a_refusal(tmp_path: Path) -> None:
    settings = load(write(tmp_path, MINIMAL))
    assert settings.discard == frozenset()
    assert settings.review_max == 10000
    assert settings.replay_keep == 0


def test_review_max_keeps_at_least_one(tmp_path: Path) -> None:
    error = refused(tmp_path, MINIMAL + "review_max = 0\n")
    assert "[post office] review_max: must be at least 1" in error


def test_replay_keep_is_a_count(tmp_path: Path) -> None:
    assert load(write(tmp_path, MINIMAL + "replay_keep = 5000\n")).replay_keep == 5000
    error = refused(tmp_path, MINIMAL + "replay_keep = lots\n")
    assert "[post office] replay_keep: not a number: 'lots'" in error


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("reject_filters, no_queue", {"reject_filters", "no_queue"}),
        ("Throttle ,auto_reply  # loops and vacation mail", {"throttle", "auto_reply"}),
        ("all", {"reject_filters", "no_queue", "auto_reply", "throttle"}),
        ("none", set()),
        ("\n    reject_filters\n    throttle", {"reject_filters", "throttle"}),
    ],
)
def test_discard_names_rule_families(tmp_path: Path, value: str, expected: set[str]) -> None:
    text = MINIMAL + f"discard = {value}\nreview_max = 50\n"
    settings = load(write(tmp_path, text))
    assert settings.discard == frozenset(expected)
    assert settings.review_max == 50


def test_discard_of_an_unknown_family_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    error = refused(tmp_path, MINIMAL + "discard = reject_filters, duplicates\n")
    assert "[post office] discard" in error
    assert "'duplicates'" in error and "reject_filters, no_queue, auto_reply, throttle" in error


def test_the_policy_section_says_where_the_policy_service_listens(tmp_path: Path) -> None:
    default = load(write(tmp_path, MINIMAL))
    assert default.policy.listen == f"unix:{tmp_path.resolve() / 'var' / 'policy.sock'}"
    assert default.policy.allow_remote is False
    text = (
        MINIMAL + "\n[policy]\nlisten = 127.0.0.1:10040  # smtpd's inet: form\nallow_remote = yes\n"
    )
    settings = load(write(tmp_path, text))
    assert settings.policy.listen == "127.0.0.1:10040"
    assert settings.policy.allow_remote is True


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("socket_mode = 0666", "[policy] socket_mode: unknown option"),
        ("listen = localhost", "[policy] listen: not an address: 'localhost'"),
        ("allow_remote = perhaps", "[policy] allow_remote: not yes or no: 'perhaps'"),
    ],
)
def test_a_bad_policy_section_is_refused_naming_the_option(
    tmp_path: Path, lines: str, message: str
) -> None:
    assert message in refused(tmp_path, MINIMAL + f"\n[policy]\n{lines}\n")
