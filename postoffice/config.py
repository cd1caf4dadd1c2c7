"""The ini file, parsed once into frozen objects .

Everything that can be wrong with a configuration is found here, at start (or
at SIGHUP), and reported as one :class:`ConfigError` line naming the file,
the section, the option and, for regexp files, the line.  Nothing downstream
re-reads the file or re-validates values.
"""

from __future__ import annotations

import configparser
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from postoffice.errors import ConfigError
from postoffice.filters import Filter, parse_filter

MAIN_SECTION = "post office"
LMTP_SECTION = "lmtp"
POLICY_SECTION = "policy"
LOGGING_SECTION = "logging"
METRICS_SECTION = "metrics"
QUEUE_PREFIX = "queue:"

DEFAULT_ZODB_PATH = "/postoffice"
DEFAULT_THROTTLE_PERIOD = 300
DEFAULT_SOCKET_MODE = 0o660
DEFAULT_MAX_SESSIONS = 64
DEFAULT_IDLE_TIMEOUT = 300.0
# Group commit: how long a commit may wait for messages other sessions are
# sending (docs/performance.md, change 13); a message waits no longer than this.
DEFAULT_COMMIT_DELAY = 0.002
MAX_COMMIT_DELAY = 1.0
DEFAULT_REVIEW_MAX = 10000
# The rule families whose refusals ``discard`` can turn into a 250 and a copy
# kept in the review area, by the names the option takes.
DISCARD_FAMILIES = ("reject_filters", "no_queue", "auto_reply", "throttle")
# The last place searched; a module constant so tests can point it elsewhere.
SYSTEM_CONFIG = Path("/etc/postoffice.ini")

_MAIN_OPTIONS = frozenset(
    {
        "zodb_uri",
        "zodb_path",
        "ooo_loop_frequency",
        "ooo_loop_headers",
        "ooo_throttle_period",
        "max_message_size",
        "reject_filters",
        "maildir",
        "dead_letter_max",
        "share",
        "discard",
        "review_max",
        "replay_keep",
    }
)
_LMTP_OPTIONS = frozenset(
    {
        "listen",
        "socket_mode",
        "max_sessions",
        "idle_timeout",
        "allow_remote",
        "commit_batch",
        "commit_delay",
    }
)
_POLICY_OPTIONS = frozenset({"listen", "allow_remote"})
_LOGGING_OPTIONS = frozenset({"level", "target", "facility"})
_METRICS_OPTIONS = frozenset({"listen", "allow_remote"})
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# syslog(3)'s facilities by name, as SysLogHandler knows them.
SYSLOG_FACILITIES = frozenset(
    {"mail", "daemon", "user", "local0", "local1", "local2", "local3", "local4", "local5"}
    | {"local6", "local7"}
)
_QUEUE_OPTIONS = frozenset({"filters"})
_TRUE = frozenset({"yes", "true", "on", "1"})
_FALSE = frozenset({"no", "false", "off", "0"})

# ` #` or ` ;` starts an inline comment on scalar options (the old docs used them).
_INLINE_COMMENT = re.compile(r"\s+[#;].*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]b?)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class LmtpSettings:
    """The ``[lmtp]`` section: where and how ``postoffice serve`` listens."""

    listen: str
    socket_mode: int = DEFAULT_SOCKET_MODE
    max_sessions: int = DEFAULT_MAX_SESSIONS
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    # LMTP has no authentication: a TCP address beyond loopback needs this.
    allow_remote: bool = False
    # Most deliveries committed in one ZODB transaction (group commit).
    commit_batch: int = 64
    # Seconds a commit waits, at most, for the messages other sessions are
    # sending (group commit; 0: commit what is there).
    commit_delay: float = DEFAULT_COMMIT_DELAY


@dataclass(frozen=True)
class PolicySettings:
    """The ``[policy]`` section: where ``postoffice policy`` listens for Postfix's smtpd.

    The policy protocol has no authentication either: a TCP address beyond
    loopback needs ``allow_remote``, as for ``[lmtp]``.
    """

    listen: str
    allow_remote: bool = False


@dataclass(frozen=True)
class LoggingSettings:
    """The ``[logging]`` section: how much ``serve``, ``policy`` and the pipe log, and where.

    ``target`` is ``stderr`` (the journal under systemd), ``syslog`` (beside
    Postfix's lines, with ``facility``) or an absolute file path.  The pipe
    never logs to stderr (pipe(8) would put it into bounces): for it,
    ``stderr`` means its own default, ``$POSTOFFICE_LOG`` or syslog.
    """

    level: int = 20  # logging.INFO
    target: str = "stderr"
    facility: str = "mail"


@dataclass(frozen=True)
class MetricsSettings:
    """The ``[metrics]`` section: where ``serve`` answers Prometheus' scrapes (None: off)."""

    listen: str | None = None
    allow_remote: bool = False


@dataclass(frozen=True)
class QueueRule:
    """One ``[queue:NAME]`` section: the queue wins when every filter matches."""

    name: str
    filters: tuple[Filter, ...]


@dataclass(frozen=True)
class Settings:
    """The whole configuration, as every other module sees it."""

    zodb_uri: str
    zodb_path: str = DEFAULT_ZODB_PATH
    ooo_loop_frequency: float = 0.0
    ooo_loop_headers: tuple[str, ...] = ()
    ooo_throttle_period: int = DEFAULT_THROTTLE_PERIOD
    max_message_size: int | None = None
    reject_filters: tuple[Filter, ...] = ()
    queues: tuple[QueueRule, ...] = ()
    maildir: Path | None = None
    lmtp: LmtpSettings = field(default_factory=lambda: LmtpSettings(listen="unix:lmtp.sock"))
    policy: PolicySettings = field(
        default_factory=lambda: PolicySettings(listen="unix:policy.sock")
    )
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None
    # Messages kept in the dead-letter area before the oldest is dropped.
    dead_letter_max: int = 1000
    # With file://, `serve` also serves the file it opened through a ZEO server
    # thread, so consumers can read while it runs; `share = no` serves nobody.
    share: bool = True
    # Rule families (DISCARD_FAMILIES) answered 250 and kept in the review
    # area instead of refused: a refusal after DATA makes Postfix bounce to a
    # sender who is often forged.  Empty: every refusal is a refusal.
    discard: frozenset[str] = frozenset()
    # Messages kept in the review area before the oldest is dropped.
    review_max: int = DEFAULT_REVIEW_MAX
    # Deliveries (one per recipient) kept, the newest, for ``postoffice replay``; 0: none.
    replay_keep: int = 0

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.queues)


class _HereInterpolation(configparser.Interpolation):
    """Expand ``%(here)s`` and ``%%`` only.

    Regexps are full of ``%`` and ``$``; BasicInterpolation would refuse a lone
    ``%`` and ExtendedInterpolation would eat ``${...}``.  A ``%`` not part of
    ``%(here)s`` or ``%%`` is left as written.
    """

    def __init__(self, here: str) -> None:
        self._here = here

    def before_get(
        self,
        parser: MutableMapping[str, Mapping[str, str]],
        section: str,
        option: str,
        value: str,
        defaults: Mapping[str, str],
    ) -> str:
        return re.sub(r"%\(here\)s|%%", lambda m: "%" if m.group() == "%%" else self._here, value)


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The search order: -C, $POSTOFFICE_CONFIG, ./, ./etc, <prefix>/etc, /etc."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{path}: no such configuration file")
        return path
    env = os.environ.get("POSTOFFICE_CONFIG")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ConfigError(f"{path}: no such configuration file (from $POSTOFFICE_CONFIG)")
        return path
    candidates = [Path("postoffice.ini"), Path("etc") / "postoffice.ini"]
    prefix = _script_prefix()
    if prefix is not None:
        candidates.append(prefix / "etc" / "postoffice.ini")
    candidates.append(SYSTEM_CONFIG)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"no configuration file found (use -C FILE; tried {tried})")


def _script_prefix() -> Path | None:
    """The folder above the running script's ``bin/`` (a virtualenv or /usr/local)."""
    script = sys.argv[0] if sys.argv else ""
    if not script or script.startswith("-"):
        return None
    try:
        return Path(script).resolve().parent.parent
    except (OSError, RuntimeError):
        return None


def parse_size(text: str) -> int:
    """``50m`` -> 52428800; k, m, g (or kb, mb, gb) are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (a number with an optional k, m or g suffix)")
    suffix = (match.group(2) or "").lower().rstrip("b")
    return int(match.group(1)) * _SIZE_FACTORS[suffix]


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and check the whole file; raise ConfigError with one line on any problem."""
    path = Path(path)
    try:
        # utf-8-sig: a BOM would otherwise make the first section header unreadable.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {_one_line(exc)}") from None
    return loads(text, path)


def loads(text: str, path: Path) -> Settings:
    """Parse configuration text as if read from ``path`` (used by tests and SIGHUP)."""
    here = str(path.resolve().parent)
    parser = configparser.ConfigParser(
        interpolation=_HereInterpolation(here),
        strict=True,
        empty_lines_in_values=False,
        default_section="\x00no defaults",
    )
    parser.optionxform = str.lower  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {_one_line(exc)}") from None
    return _Reader(parser, path, text).settings()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class _Reader:
    """Turns a ConfigParser into Settings, one checked option at a time."""

    def __init__(self, parser: configparser.ConfigParser, path: Path, text: str = "") -> None:
        self.parser = parser
        self.path = path
        self.base = path.resolve().parent
        self.lines = text.splitlines()

    def line_of(self, section: str, content: str) -> int | None:
        """The file line holding ``content`` within ``[section]``, for error messages."""
        inside = False
        wanted = content.strip()
        for number, line in enumerate(self.lines, start=1):
            stripped = line.strip()
            if stripped.startswith("[") and stripped.endswith("]"):
                inside = stripped[1:-1] == section
            elif inside and wanted and wanted in stripped:
                return number
        return None

    def error(
        self, section: str, option: str | None, what: str, line: int | None = None
    ) -> ConfigError:
        where = f"[{section}]" + (f" {option}" if option else "")
        if line is not None:
            where += f", line {line}"
        return ConfigError(f"{self.path}: {where}: {what}")

    def scalar(self, section: str, option: str) -> str | None:
        if not self.parser.has_option(section, option):
            return None
        value = _INLINE_COMMENT.sub("", self.parser.get(section, option)).strip()
        return value or None

    def number(self, section: str, option: str, kind: type, default: float | int) -> float | int:
        value = self.scalar(section, option)
        if value is None:
            return default
        try:
            number = kind(value)
        except ValueError:
            raise self.error(section, option, f"not a number: {value!r}") from None
        if not math.isfinite(number):
            raise self.error(section, option, f"not a finite number: {value!r}")
        if number < 0:
            raise self.error(section, option, f"must not be negative: {value!r}")
        return number

    def boolean(self, section: str, option: str, default: bool) -> bool:
        value = self.scalar(section, option)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise self.error(section, option, f"not yes or no: {value!r}")

    def filters(self, section: str, option: str) -> tuple[Filter, ...]:
        if not self.parser.has_option(section, option):
            return ()
        result = []
        for line in self.parser.get(section, option).splitlines():
            if not line.strip():
                continue
            try:
                result.append(parse_filter(line.strip(), self.base))
            except ValueError as exc:
                number = self.line_of(section, line)
                raise self.error(section, option, str(exc), number) from None
        return tuple(result)

    def unknown(self, section: str, allowed: frozenset[str]) -> None:
        for option in self.parser.options(section):
            if option not in allowed:
                raise self.error(section, option, "unknown option")

    def settings(self) -> Settings:
        if not self.parser.has_section(MAIN_SECTION):
            raise ConfigError(f"{self.path}: missing section [{MAIN_SECTION}]")
        main = MAIN_SECTION
        self.unknown(main, _MAIN_OPTIONS)
        zodb_uri = self.scalar(main, "zodb_uri")
        if zodb_uri is None:
            raise self.error(main, "zodb_uri", "missing (the database URI, e.g. file://...)")
        zodb_path = self.scalar(main, "zodb_path") or DEFAULT_ZODB_PATH
        if not zodb_path.strip("/"):
            raise self.error(main, "zodb_path", "must name a folder, e.g. /postoffice")
        if not zodb_path.startswith("/"):
            zodb_path = "/" + zodb_path
        frequency = float(self.number(main, "ooo_loop_frequency", float, 0.0))
        headers_text = self.scalar(main, "ooo_loop_headers") or ""
        loop_headers = tuple(h.strip() for h in headers_text.split(",") if h.strip())
        period = int(self.number(main, "ooo_throttle_period", int, DEFAULT_THROTTLE_PERIOD))
        size_text = self.scalar(main, "max_message_size")
        max_size = None
        if size_text is not None:
            try:
                max_size = parse_size(size_text) or None
            except ValueError as exc:
                raise self.error(main, "max_message_size", str(exc)) from None
        maildir_text = self.scalar(main, "maildir")
        maildir = self.base / maildir_text if maildir_text else None
        dead_max = int(self.number(main, "dead_letter_max", int, 1000))
        review_max = int(self.number(main, "review_max", int, DEFAULT_REVIEW_MAX))
        if review_max < 1:
            raise self.error(main, "review_max", "must be at least 1")

        queues: list[QueueRule] = []
        for section in self.parser.sections():
            if section in (
                MAIN_SECTION,
                LMTP_SECTION,
                POLICY_SECTION,
                LOGGING_SECTION,
                METRICS_SECTION,
            ):
                continue
            if not section.startswith(QUEUE_PREFIX):
                raise ConfigError(
                    f"{self.path}: [{section}]: unknown section (expected [{MAIN_SECTION}], "
                    f"[{LMTP_SECTION}], [{POLICY_SECTION}], [{LOGGING_SECTION}] or [queue:NAME])"
                )
            name = section[len(QUEUE_PREFIX) :].strip()
            if not name:
                raise self.error(section, None, "a queue needs a name: [queue:NAME]")
            if any(rule.name == name for rule in queues):
                raise self.error(section, None, f"a second queue named {name!r}")
            self.unknown(section, _QUEUE_OPTIONS)
            queues.append(QueueRule(name=name, filters=self.filters(section, "filters")))

        return Settings(
            zodb_uri=zodb_uri,
            zodb_path=zodb_path.rstrip("/"),
            ooo_loop_frequency=frequency,
            ooo_loop_headers=loop_headers,
            ooo_throttle_period=period,
            max_message_size=max_size,
            reject_filters=self.filters(main, "reject_filters"),
            queues=tuple(queues),
            maildir=maildir,
            lmtp=self.lmtp(),
            policy=self.policy(),
            logging=self.logging(),
            metrics=self.metrics(),
            source=self.path,
            dead_letter_max=dead_max,
            share=self.boolean(main, "share", True),
            discard=self.discard(main),
            review_max=review_max,
            replay_keep=int(self.number(main, "replay_keep", int, 0)),
        )

    def discard(self, section: str) -> frozenset[str]:
        """``discard = reject_filters, no_queue``: names from DISCARD_FAMILIES, or none."""
        text = self.scalar(section, "discard") or ""
        names = [n.strip().lower() for n in text.replace("\n", ",").split(",") if n.strip()]
        if names == ["none"]:
            return frozenset()
        if names == ["all"]:
            return frozenset(DISCARD_FAMILIES)
        for name in names:
            if name not in DISCARD_FAMILIES:
                known = ", ".join(DISCARD_FAMILIES)
                raise self.error(
                    section, "discard", f"unknown rule family {name!r} (one of {known}, all, none)"
                )
        return frozenset(names)

    def lmtp(self) -> LmtpSettings:
        section = LMTP_SECTION
        default_listen = f"unix:{self.base / 'var' / 'lmtp.sock'}"
        if not self.parser.has_section(section):
            return LmtpSettings(listen=default_listen)
        self.unknown(section, _LMTP_OPTIONS)
        listen = self.scalar(section, "listen") or default_listen
        mode_text = self.scalar(section, "socket_mode")
        mode = DEFAULT_SOCKET_MODE
        if mode_text is not None:
            try:
                mode = int(mode_text, 8)
            except ValueError:
                raise self.error(
                    section, "socket_mode", f"not an octal mode: {mode_text!r}"
                ) from None
            if mode & ~0o777:
                raise self.error(section, "socket_mode", f"not a file mode: {mode_text!r}")
        sessions = int(self.number(section, "max_sessions", int, DEFAULT_MAX_SESSIONS))
        if sessions < 1:
            raise self.error(section, "max_sessions", "must be at least 1")
        idle = float(self.number(section, "idle_timeout", float, DEFAULT_IDLE_TIMEOUT))
        batch = int(self.number(section, "commit_batch", int, 64))
        delay = float(self.number(section, "commit_delay", float, DEFAULT_COMMIT_DELAY))
        if delay > MAX_COMMIT_DELAY:
            raise self.error(section, "commit_delay", f"at most {MAX_COMMIT_DELAY:g} seconds")
        allow_remote = self.boolean(section, "allow_remote", False)
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise self.error(section, "listen", str(exc)) from None
        return LmtpSettings(
            listen=listen,
            socket_mode=mode,
            max_sessions=sessions,
            idle_timeout=idle,
            allow_remote=allow_remote,
            commit_batch=max(1, batch),
            commit_delay=delay,
        )

    def policy(self) -> PolicySettings:
        section = POLICY_SECTION
        default_listen = f"unix:{self.base / 'var' / 'policy.sock'}"
        if not self.parser.has_section(section):
            return PolicySettings(listen=default_listen)
        self.unknown(section, _POLICY_OPTIONS)
        listen = self.scalar(section, "listen") or default_listen
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise self.error(section, "listen", str(exc)) from None
        return PolicySettings(
            listen=listen, allow_remote=self.boolean(section, "allow_remote", False)
        )

    def metrics(self) -> MetricsSettings:
        section = METRICS_SECTION
        if not self.parser.has_section(section):
            return MetricsSettings()
        self.unknown(section, _METRICS_OPTIONS)
        listen = self.scalar(section, "listen")
        if listen:
            try:
                address = parse_listen(listen)
            except ValueError as exc:
                raise self.error(section, "listen", str(exc)) from None
            if address.path is not None:
                raise self.error(section, "listen", "HOST:PORT: Prometheus scrapes over TCP")
        return MetricsSettings(listen or None, self.boolean(section, "allow_remote", False))

    def logging(self) -> LoggingSettings:
        section = LOGGING_SECTION
        if not self.parser.has_section(section):
            return LoggingSettings()
        self.unknown(section, _LOGGING_OPTIONS)
        level_name = (self.scalar(section, "level") or "info").lower()
        if level_name not in LOG_LEVELS:
            raise self.error(
                section, "level", f"{level_name!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        target = self.scalar(section, "target") or "stderr"
        if target not in ("stderr", "syslog") and not os.path.isabs(target):
            raise self.error(
                section, "target", f"{target!r}: stderr, syslog or an absolute file path"
            )
        facility = (self.scalar(section, "facility") or "mail").lower()
        if facility not in SYSLOG_FACILITIES:
            raise self.error(
                section,
                "facility",
                f"{facility!r} is not one of {', '.join(sorted(SYSLOG_FACILITIES))}",
            )
        return LoggingSettings(LOG_LEVELS[level_name], target, facility)


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: a unix socket path, or a TCP host and port."""

    path: Path | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``unix:/path``, ``/path``, ``127.0.0.1:8024`` or ``[::1]:8024``."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix: needs a socket path")
        return ListenAddress(path=Path(os.path.normpath(path)))
    if text.startswith("/"):
        return ListenAddress(path=Path(os.path.normpath(text)))
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not match:
        raise ValueError(f"not an address: {text!r} (unix:/path, HOST:PORT or [IPv6]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return ListenAddress(host=host, port=port)


def warnings(settings: Settings) -> list[str]:
    """What works but is most likely a mistake; ``check`` prints these, ``serve`` logs them.

    Not errors: a configuration being written (no queue yet) or a socket
    deliberately open to a local group of senders can be meant.
    """
    found = []
    where = settings.source or "the configuration"
    mode = settings.lmtp.socket_mode
    if mode & 0o007:
        found.append(
            f"{where}: [{LMTP_SECTION}] socket_mode = {mode:04o} lets every local user deliver "
            "into the queues (LMTP has no authentication); 0660, with Postfix in the "
            "socket's group, is enough"
        )
    if not settings.queues:
        found.append(f"{where}: no [{QUEUE_PREFIX}NAME] section: every recipient is refused")
    for rule in settings.queues:
        if not rule.filters:
            found.append(f"{where}: [{QUEUE_PREFIX}{rule.name}] has no filters: it takes no mail")
    return found


def reload(path: Path | None, log: logging.Logger) -> Settings | None:
    """SIGHUP's reading of the file: the new rules, or None (logged) to keep the old ones.

    Both servers reload this way, so a broken file is refused alike: one
    ERROR line naming what is wrong, and the rules in force stay.
    """
    if path is None:
        log.warning("reload: no configuration file to read")
        return None
    try:
        return load(path)
    except ConfigError as exc:
        log.error("reload refused, the old rules stay in force: %s", exc)
        return None
