"""The run's configuration: one frozen `Config`, built by `load_config`.

Precedence, highest first: **command-line overrides > environment > YAML file > defaults**.

Environment variables (an empty value counts as unset):

- `DICOM_TRANSFER_LOCAL_URL`: `local.url`
- `DICOM_TRANSFER_DESTINATION_URL`: `destination.url`
- `DICOM_TRANSFER_LOCAL_PASSWORD`: password for `local.username` (its only source)
- `DICOM_TRANSFER_DESTINATION_PASSWORD`: password for `destination.username` (its only source)

Every problem is a `ConfigError` naming the key path (`transfer.max_in_flight: must be >= 1`);
one found in the YAML file also names `file:line:column`, one from the environment the
variable. Passwords never appear in the repr of any config object nor in `config_summary`.
"""

from __future__ import annotations

import datetime
import difflib
import math
import os
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError

LOCAL_URL_ENV = "DICOM_TRANSFER_LOCAL_URL"
DESTINATION_URL_ENV = "DICOM_TRANSFER_DESTINATION_URL"
LOCAL_PASSWORD_ENV = "DICOM_TRANSFER_LOCAL_PASSWORD"
DESTINATION_PASSWORD_ENV = "DICOM_TRANSFER_DESTINATION_PASSWORD"

MOVE_METHODS = ("auto", "move-job", "retrieve-job", "blocking")
RETRIEVES = ("move", "get")  # transfer.retrieve: C-MOVE to destination.aet, or C-GET into the local Orthanc
TRANSFER_MODES = ("direct", "relay")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


# -- the typed configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class LocalConfig:
    """The Orthanc this tool drives over REST (it issues the C-FIND / C-MOVE)."""

    url: str = "http://127.0.0.1:8042"
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SourceConfig:
    """The PACS, as a modality of the local Orthanc; aet/host/port register it (all or none)."""

    modality: str = "PACS"
    aet: str | None = None
    host: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class DestinationConfig:
    """Where the PACS's C-STOREs land; `url` None means the local Orthanc (`Config.destination_url`)."""

    aet: str = "CENTRE"
    url: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    modality: str | None = None


@dataclass(frozen=True)
class TransferConfig:
    """Throttling, retries and deadlines of the moves."""

    max_in_flight: int = 1
    pause_s: float = 0.0
    max_attempts: int = 3
    stall_s: float = 30.0
    move_timeout_s: float = 600.0
    recover_after: int = 5
    lookahead: int = 2
    poll_s: float = 0.05
    backoff_s: float = 5.0
    backoff_max_s: float = 300.0
    cooldown_s: float = 10.0
    unreachable_s: float = 900.0
    move_method: str = "auto"  # auto | move-job | retrieve-job
    retrieve: str = "move"  # move | get (C-GET: lands in the local Orthanc, needs Orthanc >= 1.12.6)
    mode: str = "direct"  # direct: the PACS sends to the destination; relay: to the local Orthanc, then forwarded


@dataclass(frozen=True)
class RelayConfig:
    """Relay mode (`transfer.mode: relay`): the local Orthanc holds, the controller forwards in bulk."""

    max_local_gb: float = 10.0  # moves wait while the local Orthanc's storage (TotalDiskSize) is at least this
    chunk_mb: float = 64.0  # one forward request carries a ZIP of at most about this many MB of instances
    forward_timeout_s: float = 600.0  # deadline of one forward request (download or upload)


@dataclass(frozen=True)
class FilterConfig:
    """Which series of a whole-study row (or of `find`) to take; case-insensitive globs."""

    modalities_include: tuple[str, ...] = ()
    modalities_exclude: tuple[str, ...] = ()
    series_description_exclude: tuple[str, ...] = ()

    def accepts(self, modality: str | None, description: str | None) -> bool:
        """True when a series passes the filter.

        An unknown modality never satisfies a non-empty include list and is never excluded;
        an unknown description is never excluded.
        """
        mod = (modality or "").strip().casefold()
        if self.modalities_include and not (mod and _matches_any(mod, self.modalities_include)):
            return False
        if mod and _matches_any(mod, self.modalities_exclude):
            return False
        desc = (description or "").strip().casefold()
        return not (desc and _matches_any(desc, self.series_description_exclude))


def _matches_any(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(value, pattern.casefold()) for pattern in patterns)


@dataclass(frozen=True)
class WindowConfig:
    """When new moves may be issued; `end <= start` wraps overnight; `days` are start days."""

    start: datetime.time
    end: datetime.time
    timezone: str
    days: tuple[str, ...] = DAYS


@dataclass(frozen=True)
class Config:
    """Everything a run needs; build it with `load_config`."""

    local: LocalConfig
    source: SourceConfig
    destination: DestinationConfig
    transfer: TransferConfig
    filter: FilterConfig
    window: WindowConfig | None
    export: Mapping[str, Any] | None
    tags: Mapping[str, Any] | None
    anonymize: Mapping[str, Any] | None
    path: Path | None
    base_dir: Path
    nifti: Mapping[str, Any] | None = None
    relay: RelayConfig = field(default_factory=RelayConfig)

    @property
    def relay_mode(self) -> bool:
        """True when series go PACS → local Orthanc → destination (`transfer.mode: relay`)."""
        return self.transfer.mode == "relay"

    def destination_url(self) -> str:
        """The destination's REST url: `destination.url`, or the local Orthanc's."""
        return self.destination.url or self.local.url

    def destination_auth(self) -> tuple[str, str | None] | None:
        """(username, password) for the destination; the local ones when it is the local Orthanc."""
        if self.destination.url is None and self.destination.username is None:
            user, password = self.local.username, self.local.password
        else:
            user, password = self.destination.username, self.destination.password
        return (user, password) if user is not None else None

    def resolve_path(self, value: str | Path) -> Path:
        """A path from the config: relative ones are relative to the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def config_summary(cfg: Config) -> dict[str, Any]:
    """A JSON-ready view of `cfg` for logs: no passwords, no patient data."""
    window = None
    if cfg.window is not None:
        window = {
            "start": cfg.window.start.strftime("%H:%M"),
            "end": cfg.window.end.strftime("%H:%M"),
            "timezone": cfg.window.timezone,
            "days": list(cfg.window.days),
        }
    return {
        "config": str(cfg.path) if cfg.path else None,
        "local": {
            "url": cfg.local.url,
            "username": cfg.local.username,
            "password_set": cfg.local.password is not None,
        },
        "source": asdict(cfg.source),
        "destination": {
            "aet": cfg.destination.aet,
            "url": cfg.destination_url(),
            "username": cfg.destination.username,
            "password_set": cfg.destination.password is not None,
            "modality": cfg.destination.modality,
        },
        "transfer": asdict(cfg.transfer),
        "filter": {name: list(value) for name, value in asdict(cfg.filter).items()},
        "window": window,
        # Only whether the optional steps are on: their values (lookup tables, replacements)
        # may hold patient data.
        "export": cfg.export is not None,
        "tags": cfg.tags is not None,
        "anonymize": cfg.anonymize is not None,
        "nifti": cfg.nifti is not None,
        **({"relay": asdict(cfg.relay)} if cfg.relay_mode else {}),
    }


# -- YAML ----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and keeps `20:00` a string.

    YAML 1.1 reads an unquoted `20:00` as the base-60 integer 1200; a time window
    written without quotes must still mean 20:00.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)

    def construct_sexagesimal_int(self, node: yaml.ScalarNode) -> Any:
        value = self.construct_scalar(node)
        return value if ":" in value else self.construct_yaml_int(node)

    def construct_sexagesimal_float(self, node: yaml.ScalarNode) -> Any:
        value = self.construct_scalar(node)
        return value if ":" in value else self.construct_yaml_float(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_sexagesimal_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_sexagesimal_float)


def _read_yaml(path: Path, label: str) -> tuple[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file", "not found", file=label) from None
    except OSError as exc:
        raise ConfigError("config file", f"cannot be read ({exc.strerror or exc})", file=label) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError("config file", "is not UTF-8 text", file=f"{label}:{line}") from None
    try:
        return text, yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}" if mark else label
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError("syntax error", problem, file=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError("syntax error", str(exc), file=label) from None


def _locate(text: str, parts: list[str]) -> yaml.Mark | None:
    """The mark of the deepest key of `parts` present in the document (the root's if none)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    mark = node.start_mark
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == part:
                mark, node = key_node.start_mark, value_node
                break
        else:
            break
    return mark


# -- validation ----------------------------------------------------------------------------

_OVERRIDE = "<override>"


class _Ctx:
    """Where each value came from, so an error can say file:line:col or the variable."""

    def __init__(self, file: Path | None, text: str | None) -> None:
        self.file = file
        self.text = text
        self.origins: dict[str, str] = {}  # key path -> env variable name or _OVERRIDE

    def error(self, key: str, reason: str) -> ConfigError:
        origin = self._origin(key)
        if origin == _OVERRIDE:
            return ConfigError(key, reason)
        if origin is not None:
            return ConfigError(key, reason, file=origin)
        if self.file is None:
            return ConfigError(key, reason)
        where = str(self.file)
        mark = _locate(self.text, key.split(".")) if self.text is not None else None
        if mark is not None:
            where = f"{where}:{mark.line + 1}:{mark.column + 1}"
        return ConfigError(key, reason, file=where)

    def _origin(self, key: str) -> str | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            origin = self.origins.get(".".join(parts[:n]))
            if origin is not None:
                return origin
        return None


Check = Callable[[_Ctx, str, Any], Any]
Spec = dict[str, "Check | Spec"]


def _got(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(minimum: int | None = None, maximum: int | None = None, nullable: bool = False) -> Check:
    def check(ctx: _Ctx, key: str, value: Any) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, f"must be an integer, got {_got(value)}")
        if minimum is not None and value < minimum:
            raise ctx.error(key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ctx.error(key, f"must be <= {maximum}, got {value}")
        return value

    return check


def _float(minimum: float, exclusive: bool = False) -> Check:
    def check(ctx: _Ctx, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(key, f"must be a number, got {_got(value)}")
        if not math.isfinite(value):
            raise ctx.error(key, f"must be a finite number, got {value}")
        if exclusive and value <= minimum:
            raise ctx.error(key, f"must be > {minimum:g}, got {value}")
        if not exclusive and value < minimum:
            raise ctx.error(key, f"must be >= {minimum:g}, got {value}")
        return float(value)

    return check


def _text(ctx: _Ctx, key: str, value: Any, nullable: bool) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise ctx.error(key, f"must be a string, got {_got(value)}")
    value = value.strip()
    if not value:
        raise ctx.error(key, "must not be empty" + (" (use null)" if nullable else ""))
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ctx.error(key, "must not contain control characters")
    return value


def _string(nullable: bool = False) -> Check:
    def check(ctx: _Ctx, key: str, value: Any) -> str | None:
        return _text(ctx, key, value, nullable)

    return check


def _modality_name(nullable: bool = False) -> Check:
    """A modality's name in the local Orthanc: it ends up in `/modalities/{name}` urls."""

    def check(ctx: _Ctx, key: str, value: Any) -> str | None:
        name = _text(ctx, key, value, nullable)
        if name is not None and ("/" in name or " " in name):
            raise ctx.error(key, f"must not contain '/' or spaces, got {name!r}")
        return name

    return check


def _url(nullable: bool = False) -> Check:
    def check(ctx: _Ctx, key: str, value: Any) -> str | None:
        url = _text(ctx, key, value, nullable)
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            raise ctx.error(key, "is not a valid url") from None
        if "@" in parts.netloc:
            # Never echo it: the user part may carry a password.
            section = key.split(".")[0]
            raise ctx.error(
                key,
                f"must not contain credentials: use {section}.username and the environment "
                f"variable {_PASSWORD_ENV[section]}",
            )
        if parts.scheme not in ("http", "https") or not url.lower().startswith(("http://", "https://")):
            raise ctx.error(key, f"must start with http:// or https://, got {url!r}")
        if not host:
            raise ctx.error(key, f"has no host, got {url!r}")
        return url.rstrip("/")

    return check


def _ae_title(nullable: bool = False) -> Check:
    """A DICOM AE title: 1-16 characters of ASCII, no backslash or control character."""

    def check(ctx: _Ctx, key: str, value: Any) -> str | None:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise ctx.error(key, f"must be a string (an AE title), got {_got(value)}")
        if not value.strip():
            raise ctx.error(key, "must not be empty or only spaces")
        if any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in value):
            raise ctx.error(key, "must not contain a backslash or control characters")
        if not value.isascii():
            raise ctx.error(key, f"must be ASCII, got {value!r}")
        # Leading and trailing spaces are not significant in an AE title.
        value = value.strip()
        if len(value) > 16:
            raise ctx.error(key, f"must be at most 16 characters, got {len(value)} ({value!r})")
        return value

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(ctx: _Ctx, key: str, value: Any) -> str:
        if value not in options:
            raise ctx.error(key, f"must be one of {', '.join(options)}, got {_got(value)}")
        return value

    return check


def _patterns(ctx: _Ctx, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ctx.error(key, f"must be a list of patterns, got {_got(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ctx.error(key, f"item {i + 1} must be a non-empty string, got {_got(item)}")
        out.append(item.strip())
    return tuple(out)


_HHMM = re.compile(r"(\d{1,2}):(\d{2})")


def _time(ctx: _Ctx, key: str, value: Any) -> datetime.time:
    text = value.strip() if isinstance(value, str) else None
    m = _HHMM.fullmatch(text) if text else None
    if m is None or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ctx.error(key, f'must be a time "HH:MM" between 00:00 and 23:59, got {_got(value)}')
    return datetime.time(int(m.group(1)), int(m.group(2)))


def _timezone(ctx: _Ctx, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(key, f"must be an IANA time zone name such as Europe/Zurich, got {_got(value)}")
    name = value.strip()
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ctx.error(key, f"unknown time zone {name!r}") from None
    return name


def _days(ctx: _Ctx, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ctx.error(key, f"must be a non-empty list of days (mon .. sun), got {_got(value)}")
    chosen = set()
    for item in value:
        name = item.strip().lower() if isinstance(item, str) else ""
        if name not in DAYS and name not in _FULL_DAYS:
            raise ctx.error(key, f"unknown day {_got(item)} (use {', '.join(DAYS)})")
        chosen.add(name[:3])
    return tuple(d for d in DAYS if d in chosen)


def _password(env_var: str) -> Check:
    def check(ctx: _Ctx, key: str, value: Any) -> Any:
        raise ctx.error(key, f"passwords come from the environment variable {env_var}, not the config file")

    return check


_MAX_NODES = 100_000
_MAX_DEPTH = 32


def _free_mapping(ctx: _Ctx, key: str, value: Any) -> Mapping[str, Any] | None:
    """A section checked later by its own step: null or a mapping, kept read-only.

    Nested mappings become `MappingProxyType`, lists become tuples.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ctx.error(key, f"must be a mapping or null, got {_got(value)}")
    budget = [_MAX_NODES]

    def freeze(item: Any, depth: int) -> Any:
        budget[0] -= 1
        if depth > _MAX_DEPTH or budget[0] < 0:
            # Also what a recursive YAML alias or an alias bomb ends in.
            raise ctx.error(key, "is nested too deeply or too large")
        if isinstance(item, Mapping):
            return MappingProxyType({k: freeze(v, depth + 1) for k, v in item.items()})
        if isinstance(item, (list, tuple)):
            return tuple(freeze(v, depth + 1) for v in item)
        return item

    return freeze(value, 0)


_PASSWORD_ENV = {"local": LOCAL_PASSWORD_ENV, "destination": DESTINATION_PASSWORD_ENV}

_SPEC: Spec = {
    "local": {
        "url": _url(),
        "username": _string(nullable=True),
        "password": _password(LOCAL_PASSWORD_ENV),
    },
    "source": {
        "modality": _modality_name(),
        "aet": _ae_title(nullable=True),
        "host": _string(nullable=True),
        "port": _int(1, 65535, nullable=True),
    },
    "destination": {
        "aet": _ae_title(),
        "url": _url(nullable=True),
        "username": _string(nullable=True),
        "password": _password(DESTINATION_PASSWORD_ENV),
        "modality": _modality_name(nullable=True),
    },
    "transfer": {
        "max_in_flight": _int(1),
        "pause_s": _float(0),
        "max_attempts": _int(1),
        "stall_s": _float(0),
        "move_timeout_s": _float(0, exclusive=True),
        "recover_after": _int(1),
        "lookahead": _int(0),
        "poll_s": _float(0, exclusive=True),
        "backoff_s": _float(0),
        "backoff_max_s": _float(0),
        "cooldown_s": _float(0),
        "unreachable_s": _float(0),
        "move_method": _choice(MOVE_METHODS),
        "retrieve": _choice(RETRIEVES),
        "mode": _choice(TRANSFER_MODES),
    },
    "relay": {
        "max_local_gb": _float(0, exclusive=True),
        "chunk_mb": _float(0, exclusive=True),
        "forward_timeout_s": _float(0, exclusive=True),
    },
    "filter": {
        "modalities": {"include": _patterns, "exclude": _patterns},
        "series_description": {"exclude": _patterns},
    },
    "window": {"start": _time, "end": _time, "timezone": _timezone, "days": _days},
    "export": _free_mapping,
    "tags": _free_mapping,
    "anonymize": _free_mapping,
    "nifti": _free_mapping,
}

_NULLABLE_SECTIONS = ("window",)  # null means "off"; other sections' null means "defaults"


def _unknown(name: str, known: Mapping[str, Any]) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if match:
        return f"unknown key (did you mean {match[0]}?)"
    return f"unknown key (known: {', '.join(known)})"


def _parse(ctx: _Ctx, path: str, raw: Any, spec: Spec) -> dict[str, Any]:
    """Check `raw` against `spec`: unknown keys, types, ranges; returns converted values."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ctx.error(path or "config", f"must be a mapping, got {_got(raw)}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key)
        full = f"{path}.{name}" if path else name
        sub = spec.get(name)
        if sub is None:
            raise ctx.error(full, _unknown(name, spec))
        if isinstance(sub, dict):
            if value is None and name in _NULLABLE_SECTIONS:
                out[name] = None
            else:
                out[name] = _parse(ctx, full, value, sub)
        else:
            out[name] = sub(ctx, full, value)
    return out


# -- environment and overrides ---------------------------------------------------------------


def _set_dotted(ctx: _Ctx, raw: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(dotted or "(empty)", "is not a valid key path")
    node = raw
    for n, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
            ctx.origins.setdefault(".".join(parts[: n + 1]), origin)
        elif not isinstance(child, dict):
            raise ctx.error(".".join(parts[: n + 1]), f"must be a mapping, got {_got(child)}")
        node = child
    node[parts[-1]] = value
    ctx.origins[dotted] = origin


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value else None


def _apply_env(ctx: _Ctx, raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for var, key in ((LOCAL_URL_ENV, "local.url"), (DESTINATION_URL_ENV, "destination.url")):
        value = _env_value(env, var)
        if value is not None:
            _set_dotted(ctx, raw, key, value, var)


def _apply_overrides(ctx: _Ctx, raw: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if value is None:  # an option that was not given
            continue
        if not isinstance(key, str):
            raise ConfigError(repr(key), "override keys must be dotted strings like transfer.max_in_flight")
        _set_dotted(ctx, raw, key, value, _OVERRIDE)


# -- building the Config ---------------------------------------------------------------------


def _source(ctx: _Ctx, values: dict[str, Any]) -> SourceConfig:
    given = [k for k in ("aet", "host", "port") if values.get(k) is not None]
    if given and len(given) < 3:
        missing = [k for k in ("aet", "host", "port") if k not in given]
        raise ctx.error(
            f"source.{missing[0]}",
            f"aet, host and port go together (given: {', '.join(given)}; missing: {', '.join(missing)})",
        )
    return SourceConfig(**values)


def _transfer(ctx: _Ctx, values: dict[str, Any]) -> TransferConfig:
    transfer = TransferConfig(**values)
    if transfer.backoff_max_s < transfer.backoff_s:
        raise ctx.error(
            "transfer.backoff_max_s",
            f"must be >= transfer.backoff_s ({transfer.backoff_s:g}), got {transfer.backoff_max_s:g}",
        )
    return transfer


def _same_url(a: str, b: str) -> bool:
    """Whether two REST urls name the same server (scheme, host and port; trailing slashes ignored)."""

    def key(url: str) -> tuple[str, str, int | None, str]:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
        return scheme, (parts.hostname or "").lower(), port, parts.path.rstrip("/")

    return key(a) == key(b)


def _check_retrieve(ctx: _Ctx, local: LocalConfig, destination: DestinationConfig, transfer: TransferConfig) -> None:
    """C-GET stores into the Orthanc that issued it: the local one must be the destination,
    or relay mode must forward from it."""
    if transfer.retrieve != "get":
        return
    relayed = transfer.mode == "relay"  # the local Orthanc holds, the forward crosses to the destination
    if destination.url is not None and not _same_url(destination.url, local.url) and not relayed:
        raise ctx.error(
            "transfer.retrieve",
            f"get: a C-GET lands in the local Orthanc ({local.url}), but destination.url is {destination.url};"
            " set destination.url to null (or to local.url), use transfer.mode: relay to forward from there,"
            " or use retrieve: move",
        )
    if transfer.move_method != "auto":
        raise ctx.error(
            "transfer.move_method",
            f"must be auto with transfer.retrieve: get (C-GET always runs as an asynchronous job),"
            f" got {transfer.move_method}",
        )


def _check_relay(ctx: _Ctx, transfer: TransferConfig, local: LocalConfig, destination: DestinationConfig) -> None:
    """Relay mode deletes the local copy once the destination holds it: they must be two servers."""
    if transfer.mode != "relay":
        return
    if destination.url is None or destination.url.rstrip("/") == local.url.rstrip("/"):
        raise ctx.error(
            "transfer.mode",
            "relay needs destination.url set to an Orthanc other than local.url (the local copy is"
            " deleted once the destination holds the series)",
        )


def _window(ctx: _Ctx, values: dict[str, Any] | None) -> WindowConfig | None:
    if values is None:
        return None
    for key in ("start", "end", "timezone"):
        if key not in values:
            raise ctx.error(f"window.{key}", "is required when window is set")
    if values["start"] == values["end"]:
        raise ctx.error("window.end", "must differ from window.start (leave window null to never stop)")
    return WindowConfig(**values)


def _filter(values: dict[str, Any]) -> FilterConfig:
    modalities = values.get("modalities", {})
    return FilterConfig(
        modalities_include=modalities.get("include", ()),
        modalities_exclude=modalities.get("exclude", ()),
        series_description_exclude=values.get("series_description", {}).get("exclude", ()),
    )


def load_config(
    path: str | Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, validate and merge the configuration (overrides > environment > YAML > defaults).

    `path` None means defaults only. `env` defaults to `os.environ`. `overrides` maps dotted
    key paths to values (`{"transfer.max_in_flight": 4}`), validated like YAML values; a
    None value means "option not given" and is skipped.
    """
    env = os.environ if env is None else env
    file = Path(path).expanduser().resolve() if path is not None else None
    text, raw = _read_yaml(file, str(path)) if file is not None else (None, None)
    ctx = _Ctx(Path(path) if path is not None else None, text)
    if raw is None:
        raw = {}
    elif not isinstance(raw, dict):
        raise ctx.error("config", f"the top level must be a mapping of sections, got {_got(raw)}")

    _apply_env(ctx, raw, env)
    _apply_overrides(ctx, raw, overrides or {})
    values = _parse(ctx, "", raw, _SPEC)

    local = LocalConfig(**values.get("local", {}), password=_env_value(env, LOCAL_PASSWORD_ENV))
    destination = DestinationConfig(**values.get("destination", {}), password=_env_value(env, DESTINATION_PASSWORD_ENV))
    transfer = _transfer(ctx, values.get("transfer", {}))
    _check_retrieve(ctx, local, destination, transfer)
    _check_relay(ctx, transfer, local, destination)
    return Config(
        local=local,
        source=_source(ctx, values.get("source", {})),
        destination=destination,
        transfer=transfer,
        filter=_filter(values.get("filter", {})),
        window=_window(ctx, values.get("window")),
        export=values.get("export"),
        tags=values.get("tags"),
        anonymize=values.get("anonymize"),
        nifti=values.get("nifti"),
        relay=RelayConfig(**(values.get("relay") or {})),
        path=file,
        base_dir=file.parent if file is not None else Path.cwd(),
    )
