"""The CLI's configuration, layered in one place.

Precedence, highest first: command-line flags, ``SHOAL_*`` (and the standard
``AWS_*``) environment variables, the config file, defaults.  The config file
is TOML at ``--config``, ``$SHOAL_CONFIG`` or ``~/.config/shoal/config.toml``::

    [cache]
    dir = "~/.cache/shoal"       # SHOAL_CACHE_DIR, --cache-dir
    size = "20GB"                # SHOAL_CACHE_SIZE, --cache-size
    enabled = true               # SHOAL_CACHE=off, --no-cache

    [s3]
    endpoint_url = "http://127.0.0.1:8333"   # SHOAL_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, --endpoint-url
    region = "us-east-1"                     # SHOAL_REGION, AWS_REGION, --region
    profile = "analytics"                    # SHOAL_PROFILE, AWS_PROFILE, --profile-name

    [sql]
    workers = 4                  # SHOAL_WORKERS, --workers
    format = "table"             # SHOAL_FORMAT, --format
    catalog = "catalog.toml"     # SHOAL_CATALOG, --catalog

    [tables]
    trips = "s3://data/trips/*.parquet"
    events = { url = "s3://data/events/", hive_partitioning = true }

Credentials never come from this file: they are left to the AWS credential
chain (environment, ``~/.aws/credentials``, profiles, instance roles), and a
file that contains one is rejected.  :meth:`Config.show` never prints them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import tomllib
from shoal.cache import CacheConfig, StorageConfigError, StoreConfig, default_cache_dir, parse_size
from shoal.cache.config import DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_SIZE
from shoal.engine import CatalogError, TableDef

from .errors import ConfigError

__all__ = ["Config", "Setting", "SETTINGS", "FORMATS", "config_path", "state_dir"]

FORMATS = ("table", "csv", "json", "parquet")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
#: Keys that would hold credentials; rejected anywhere in the config file.
_CREDENTIAL_KEYS = {
    "access_key", "secret_key", "secret", "session_token", "token", "password",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "key",
}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _integer(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    if not isinstance(value, (int, float, str)):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except OverflowError:  # inf
        raise ValueError(f"expected an integer, got {value!r}") from None


def _positive_int(value: Any) -> int:
    number = _integer(value)
    if number < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _count(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return number


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def _text(value: Any) -> str:
    """A string setting: from the file it must be a TOML string; never a NUL byte."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    return value


def _format(value: Any) -> str:
    text = _text(value).strip().lower()
    if text not in FORMATS:
        raise ValueError(f"expected one of {', '.join(FORMATS)}, got {value!r}")
    return text


def _size(value: Any) -> int:
    try:
        return parse_size(value)
    except StorageConfigError as exc:
        raise ValueError(str(exc)) from None


@dataclass(frozen=True)
class Setting:
    """One configurable value: its file key, environment variables and flag."""

    key: str
    env: tuple[str, ...]
    flag: str | None
    parse: Callable[[Any], Any]
    default: Any = None
    is_path: bool = False
    help: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("cache.dir", ("SHOAL_CACHE_DIR",), "cache_dir", _text, None, True, "block cache directory"),
    Setting("cache.size", ("SHOAL_CACHE_SIZE",), "cache_size", _size, DEFAULT_CACHE_SIZE, help="cache size limit"),
    Setting("cache.block_size", ("SHOAL_CACHE_BLOCK_SIZE",), None, _size, DEFAULT_BLOCK_SIZE),
    Setting("cache.enabled", ("SHOAL_CACHE",), "cache_enabled", _bool, True),
    Setting("s3.endpoint_url", ("SHOAL_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "endpoint_url",
            _text),
    Setting("s3.region", ("SHOAL_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"), "region", _text),
    Setting("s3.profile", ("SHOAL_PROFILE", "AWS_PROFILE"), "profile_name", _text),
    Setting("s3.anonymous", ("SHOAL_S3_ANONYMOUS",), "anonymous", _bool, False),
    Setting("s3.connect_timeout", ("SHOAL_S3_CONNECT_TIMEOUT",), None, _seconds, 5.0),
    Setting("s3.read_timeout", ("SHOAL_S3_READ_TIMEOUT",), None, _seconds, 60.0),
    Setting("s3.max_attempts", ("SHOAL_S3_MAX_ATTEMPTS",), None, _positive_int, 5),
    Setting("sql.workers", ("SHOAL_WORKERS",), "workers", _positive_int, None),
    Setting("sql.executor", ("SHOAL_EXECUTOR",), None, _text, None, help="engine default when unset"),
    Setting("sql.cluster", ("SHOAL_CLUSTER",), "cluster", _text, None,
            help="ray://host:port, host:port or auto: run workers on a Ray cluster"),
    Setting("sql.format", ("SHOAL_FORMAT",), "format", _format, "table"),
    Setting("sql.catalog", ("SHOAL_CATALOG",), "catalog", _text, None, True),
    Setting("sql.max_rows", ("SHOAL_MAX_ROWS",), "max_rows", _count, None),
)
_BY_KEY = {s.key: s for s in SETTINGS}
_FLAG_NAMES = {"cache_enabled": "--no-cache"}
#: Shown (masked) by ``config show``; never read from the file, never printed.
_CREDENTIAL_ENV = (
    ("s3.access_key", "AWS_ACCESS_KEY_ID"),
    ("s3.secret_key", "AWS_SECRET_ACCESS_KEY"),
    ("s3.session_token", "AWS_SESSION_TOKEN"),
)


def config_path(flag: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file and whether it was named explicitly (then it must exist)."""
    if flag:
        return Path(flag).expanduser(), True
    if env.get("SHOAL_CONFIG"):
        return Path(env["SHOAL_CONFIG"]).expanduser(), True
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "shoal" / "config.toml", False


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the shell keeps its history: next to ``$SHOAL_CONFIG``, else the XDG state dir."""
    env = os.environ if env is None else env
    if env.get("SHOAL_CONFIG"):
        return Path(env["SHOAL_CONFIG"]).expanduser().resolve().parent
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "shoal"


@dataclass(frozen=True)
class Resolved:
    value: Any
    source: str


@dataclass(frozen=True)
class TableEntry:
    table: TableDef
    source: str


class Config:
    """The effective configuration: each value with where it came from."""

    def __init__(self, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 *, config_file: str | None = None, table_flags: list[str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        self.path, explicit = config_path(config_file, self.env)
        self.file_data = self._read_file(self.path, explicit)
        self.values: dict[str, Resolved] = {s.key: self._resolve(s, flags) for s in SETTINGS}
        self.table_entries = self._resolve_tables(table_flags or [])

    # -- sources ----------------------------------------------------------------------

    def _read_file(self, path: Path, explicit: bool) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"config file not found: {path}") from None
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except (UnicodeDecodeError, ValueError) as exc:  # not UTF-8; a NUL byte in the path
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid config file {path}: {exc}") from None
        except RecursionError:
            raise ConfigError(f"invalid config file {path}: nested too deeply") from None
        self._reject_credentials(data, path, "")
        known = {"cache", "s3", "sql", "tables"}
        for section, body in data.items():
            if section not in known:
                raise ConfigError(f"config file {path}: unknown section [{section}] "
                                  f"(known: {', '.join(sorted(known))})")
            if not isinstance(body, dict):
                raise ConfigError(f"config file {path}: [{section}] must be a table")
            if section == "tables":
                continue
            for key in body:
                if f"{section}.{key}" not in _BY_KEY:
                    allowed = ", ".join(k.split(".", 1)[1] for k in _BY_KEY if k.startswith(section + "."))
                    raise ConfigError(f"config file {path}: unknown key {key!r} in [{section}] (known: {allowed})")
        return data

    def _reject_credentials(self, data: Mapping[str, Any], path: Path, prefix: str) -> None:
        todo = [(data, prefix)]  # a loop, not recursion: [a.a.a...] may nest thousands deep
        while todo:
            table, prefix = todo.pop()
            for key, value in table.items():
                if prefix != "tables." and key.lower() in _CREDENTIAL_KEYS:
                    raise ConfigError(
                        f"config file {path} contains credentials ({prefix}{key}); remove them and use the "
                        "AWS credential chain instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                        "~/.aws/credentials, or --profile-name)"
                    )
                if isinstance(value, dict):
                    todo.append((value, f"{prefix}{key}."))

    def _resolve(self, setting: Setting, flags: Mapping[str, Any]) -> Resolved:
        section, key = setting.key.split(".", 1)
        candidates: list[tuple[Any, str]] = []
        if setting.flag and setting.flag in flags:
            flag_name = _FLAG_NAMES.get(setting.flag, "--" + setting.flag.replace("_", "-"))
            candidates.append((flags[setting.flag], flag_name))
        for name in setting.env:
            if self.env.get(name, "").strip():
                candidates.append((self.env[name].strip(), f"env {name}"))
                break
        file_section = self.file_data.get(section, {})
        if key in file_section:
            candidates.append((file_section[key], f"file {self.path}"))
        if not candidates:
            return Resolved(setting.default, "default")
        raw, source = candidates[0]
        try:
            value = setting.parse(raw)
            if setting.is_path:
                value = str(Path(value).expanduser())
                if source.startswith("file "):  # relative to the config file
                    value = str((self.path.parent / value).resolve())
        except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # RuntimeError: "~nosuchuser"
            raise ConfigError(f"invalid {setting.key} from {source}: {exc}") from None
        return Resolved(value, source)

    def _resolve_tables(self, table_flags: list[str]) -> list[TableEntry]:
        entries: dict[str, TableEntry] = {}
        try:
            for name, spec in self.file_data.get("tables", {}).items():
                if isinstance(spec, str):
                    spec = {"url": spec}
                if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
                    raise ConfigError(f"config file {self.path}: table {name!r} needs a URL")
                unknown = sorted(set(spec) - {"url", "hive_partitioning"})
                hive = spec.get("hive_partitioning")
                if unknown or not isinstance(hive, (bool, type(None))):
                    raise ConfigError(f"config file {self.path}: table {name!r} takes url = \"...\" and "
                                      "hive_partitioning = true|false only")
                table = TableDef(name=name, url=spec["url"], hive_partitioning=hive)
                entries[name.lower()] = TableEntry(table, f"file {self.path}")
            for item in table_flags:
                name, sep, url = item.partition("=")
                if not sep or not name.strip() or not url.strip():
                    raise ConfigError(f"--table expects NAME=URL, got {item!r}")
                table = TableDef(name=name.strip(), url=url.strip())
                entries[name.strip().lower()] = TableEntry(table, "--table")
        except CatalogError as exc:
            raise ConfigError(str(exc)) from None
        return list(entries.values())

    # -- values --------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return self.values[key].value

    def source(self, key: str) -> str:
        return self.values[key].source

    def cache_config(self, *, enabled: bool | None = None) -> CacheConfig:
        directory = self["cache.dir"]
        return CacheConfig(
            directory=Path(directory) if directory else default_cache_dir(),
            size_limit=self["cache.size"],
            block_size=self["cache.block_size"],
            enabled=self["cache.enabled"] if enabled is None else enabled,
        )

    def store_config(self) -> StoreConfig:
        # Keys and tokens stay with botocore's credential chain: never copied here.
        return StoreConfig(
            endpoint_url=self["s3.endpoint_url"],
            region=self["s3.region"],
            profile=self["s3.profile"],
            anonymous=self["s3.anonymous"],
            connect_timeout=self["s3.connect_timeout"],
            read_timeout=self["s3.read_timeout"],
            max_attempts=self["s3.max_attempts"],
        )

    # -- display ---------------------------------------------------------------------------

    def show(self) -> list[dict[str, Any]]:
        """Every effective value with its source; credentials only as ``***``."""
        rows: list[dict[str, Any]] = [{"key": "config_file", "value": str(self.path),
                                       "source": "exists" if self.path.exists() else "not found"}]
        for setting in SETTINGS:
            resolved = self.values[setting.key]
            value = resolved.value
            if setting.key == "cache.dir" and value is None:
                value = str(default_cache_dir())
            if setting.key == "sql.workers" and value is None:
                value = os.cpu_count() or 1
            rows.append({"key": setting.key, "value": value, "source": resolved.source})
        for key, name in _CREDENTIAL_ENV:
            present = bool(self.env.get(name))
            rows.append({"key": key, "value": "***" if present else None,
                         "source": f"env {name}" if present else "AWS credential chain"})
        for entry in self.table_entries:
            rows.append({"key": f"tables.{entry.table.name}", "value": entry.table.url, "source": entry.source})
        return rows
