"""Fuzzing the parsers of user input: catalog files, the CLI configuration,
sizes, cache directories, URLs and SQL.

The catalog file (``[tables]`` TOML), the CLI configuration (config file,
``SHOAL_*`` values, flags), sizes (``"20GB"``), and SQL (DuckDB's parse tree,
predicate splitting and the statement gate of :meth:`Session.sql`) may only
succeed, with a value that respects its limits, or raise their layer's
documented error type.  (The peer protocol: ``test_fuzz_transport.py``.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import struct
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pytest
import xxhash
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_transport_helpers import SECRET, raw_connect, raw_handshake

from shoal.cache import CacheConfig, StorageConfigError, StorageError, StoreConfig, parse_size
from shoal.cache.config import MAX_SIZE
from shoal.cache.source import split_url
from shoal.cli.config import FORMATS, SETTINGS, Config
from shoal.cli.errors import ConfigError
from shoal.engine import Catalog, CatalogError, EngineError, QueryError, Session, SqlSyntaxError
from shoal.engine.sqlinfo import column_references, parse_tree, table_references, top_level_conjuncts
from shoal.transport import (
    BlockRequest, BlockServer, FrameTooLarge, MemoryProvider, Origin, Outcome, PeerUnavailable, ProtocolError,
    ServerConfig, TcpTransport,
)
from shoal.transport import _io
from shoal.transport.messages import MAX_SUMS, MIN_CHUNK, BlockReply, RdmaSlot, decode_get, encode_get
from shoal.transport.protocol import (
    CHUNK, FLAG_FILL, FLAG_RDMA, HARD_MAX_META, HARD_MAX_PAYLOAD, MAGIC, MAX_KEY, MAX_TEXT, MAX_TOKEN, VERSION,
    Limits, MsgType, Reader, Status, Writer, decode_header, encode_frame,
)


def fuzz(examples: int) -> Any:
    """Hypothesis settings of this file: no deadline (two shared CPUs), no health checks."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


# == catalog files ===========================================================================


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _toml_document(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, body in sections.items():
        lines.append(f"[{_toml_string(section)}]")
        lines += [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


NAME = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), st.text(max_size=10),
                 st.sampled_from(["../etc", "a.b", "x;DROP", "t t", "ok"]))
URL = st.one_of(st.sampled_from(["s3://b/t/*.parquet", "s3://b/p/", "/data/x.parquet", "", "a\x00b"]),
                st.text(max_size=30))
SCALARS = st.one_of(st.text(max_size=8), st.integers(-2**63, 2**63 - 1), st.booleans(), st.floats(allow_nan=True))
SPEC = st.one_of(URL, SCALARS, st.lists(st.integers(), max_size=2),
                 st.fixed_dictionaries({}, optional={"url": st.one_of(URL, SCALARS),
                                                     "hive_partitioning": st.one_of(st.booleans(), SCALARS),
                                                     "colour": SCALARS}))


VALID_NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
VALID_URL = st.one_of(st.sampled_from(["s3://b/t/*.parquet", "s3://b/p/", "/data/x.parquet", "s3://b/dt=1/"]),
                      st.text(min_size=1, max_size=20).filter(lambda u: "\x00" not in u))
VALID_SPEC = st.one_of(VALID_URL, st.fixed_dictionaries({"url": VALID_URL},
                                                       optional={"hive_partitioning": st.booleans()}))


def _table_ok(name: str, spec: Any) -> bool:
    if isinstance(spec, str):
        spec = {"url": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str) or set(spec) - {"url", "hive_partitioning"}:
        return False
    if not isinstance(spec.get("hive_partitioning", False), bool):
        return False
    return bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name)) and bool(spec["url"]) and "\x00" not in spec["url"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_catalog_files_load_exactly_the_valid_tables_or_raise_catalog_error(scratch: Path) -> None:
    @fuzz(200)
    @given(tables=st.one_of(st.dictionaries(NAME, SPEC, max_size=4),
                            st.dictionaries(VALID_NAME, VALID_SPEC, max_size=4)))
    def run(tables: dict[str, Any]) -> None:
        path = scratch / "catalog.toml"
        path.write_text(_toml_document({"tables": tables}), encoding="utf-8")
        catalog = Catalog()
        if all(_table_ok(n, s) for n, s in tables.items()):
            catalog.load_toml(path)
            last = {name.lower(): spec for name, spec in tables.items()}  # names are case-insensitive
            assert len(catalog) == len(last)
            for name, spec in last.items():
                table = catalog.get(name)
                assert table is not None and table.url == (spec if isinstance(spec, str) else spec["url"])
                if isinstance(spec, dict) and "hive_partitioning" in spec:
                    assert table.hive is spec["hive_partitioning"]
        else:
            with pytest.raises(CatalogError):
                catalog.load_toml(path)

    run()


def test_any_catalog_bytes_load_or_raise_catalog_error(scratch: Path) -> None:
    @fuzz(200)
    @given(data=st.one_of(st.binary(max_size=200),
                          st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                          st.sampled_from([b"[tables]\nx = " + b"[" * 3000 + b"]" * 3000,
                                           b"x = " + b"{a=" * 2000 + b"1" + b"}" * 2000, b"\xff\xfe[tables]"])))
    def run(data: bytes) -> None:
        path = scratch / "raw.toml"
        path.write_bytes(data)
        catalog = Catalog()
        try:
            catalog.load_toml(path)
        except CatalogError:
            return
        for table in catalog:
            assert _table_ok(table.name, table.url)

    run()
    for bad in (scratch, scratch / "missing.toml", str(scratch / "a\x00b.toml")):  # a directory, nothing, a NUL
        with pytest.raises(CatalogError):
            Catalog().load_toml(bad)


# == the CLI configuration ===================================================================

ENV_NAMES = sorted({name for setting in SETTINGS for name in setting.env if name.startswith("SHOAL_")})
TRICKY = ["20GB", "512MiB", "0", "-1", "1.5", " 4 ", "inf", "nan", "-inf", "1e3", "9" * 30, "9" * 400, "１２",
          "~nosuchuser_shoal/x", "a\x00b", "true", "off", "yes", "json", "CSV", "", " ", "0x10", "1_000"]
ENV_VALUES = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
FILE_KEYS = {"cache": ["dir", "size", "block_size", "enabled", "colour"],
             "s3": ["endpoint_url", "region", "profile", "anonymous", "connect_timeout", "read_timeout", "max_attempts",
                    "secret_key"],
             "sql": ["workers", "executor", "cluster", "format", "catalog", "max_rows"]}
FILE_VALUES = st.one_of(st.sampled_from(TRICKY), SCALARS, st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FILE_SECTIONS = st.dictionaries(
    st.sampled_from(["cache", "s3", "sql", "colour"]),
    st.sampled_from(sorted(FILE_KEYS)).flatmap(
        lambda s: st.dictionaries(st.sampled_from(FILE_KEYS[s]), FILE_VALUES, max_size=3)),
    max_size=3)
SIZES = st.from_regex(r"[0-9]{1,5}(\.[0-9]{1,2})? ?(|k|KiB|MiB|mb|GB|g|TiB)", fullmatch=True)
COUNTS = st.integers(0, 64).map(str)
SECONDS = st.floats(0.001, 600).map(repr)
PLAIN = st.text(min_size=1, max_size=12).filter(lambda t: "\x00" not in t and "~" not in t[:1] and t.strip())
#: Values each SHOAL_* variable would plausibly hold (most resolve), next to anything at all.
VALID_ENV = {"SHOAL_CACHE_DIR": PLAIN, "SHOAL_CACHE_SIZE": SIZES, "SHOAL_CACHE_BLOCK_SIZE": SIZES,
             "SHOAL_CACHE": st.sampled_from(["on", "off", "0", "1", "TRUE", "no"]), "SHOAL_ENDPOINT_URL": PLAIN,
             "SHOAL_REGION": PLAIN, "SHOAL_PROFILE": PLAIN, "SHOAL_S3_ANONYMOUS": st.sampled_from(["yes", "false"]),
             "SHOAL_S3_CONNECT_TIMEOUT": SECONDS, "SHOAL_S3_READ_TIMEOUT": SECONDS, "SHOAL_S3_MAX_ATTEMPTS": COUNTS,
             "SHOAL_WORKERS": COUNTS, "SHOAL_EXECUTOR": st.sampled_from(["local", "threads"]), "SHOAL_CLUSTER": PLAIN,
             "SHOAL_FORMAT": st.sampled_from([f.upper() for f in FORMATS] + list(FORMATS)), "SHOAL_CATALOG": PLAIN,
             "SHOAL_MAX_ROWS": COUNTS}
VALID_FILE = st.fixed_dictionaries({}, optional={
    "cache": st.fixed_dictionaries({}, optional={"size": st.one_of(SIZES, st.integers(0, 2**40)),
                                                 "block_size": st.sampled_from([4096, "64KiB", "8MiB", 3000]),
                                                 "enabled": st.booleans(), "dir": PLAIN}),
    "s3": st.fixed_dictionaries({}, optional={"read_timeout": st.floats(0.001, 600), "max_attempts": st.integers(1, 9),
                                              "region": PLAIN, "anonymous": st.booleans()}),
    "sql": st.fixed_dictionaries({}, optional={"workers": st.integers(1, 64), "format": st.sampled_from(FORMATS),
                                               "max_rows": st.integers(0, 100)})})
FLAGS = st.fixed_dictionaries({}, optional={"cache_size": ENV_VALUES, "workers": ENV_VALUES, "format": ENV_VALUES,
                                            "cache_dir": ENV_VALUES, "max_rows": ENV_VALUES})
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/fuzz-secret-key"


def test_cli_configuration_resolves_to_typed_values_or_raises_config_error(scratch: Path) -> None:
    """Any config file, any ``SHOAL_*`` values, any flag strings: a
    :class:`ConfigError`, or settings of the right type and range (sizes
    within int64, timeouts finite, no NUL in a path); the cache and store
    configs then build or raise :class:`StorageConfigError`, and ``config
    show`` works and never prints the secret key."""

    @fuzz(250)
    @given(env=st.one_of(st.dictionaries(st.sampled_from(ENV_NAMES), ENV_VALUES, max_size=5),
                         st.fixed_dictionaries({}, optional=VALID_ENV)),
           sections=st.one_of(FILE_SECTIONS, VALID_FILE), flags=st.one_of(st.just({}), FLAGS))
    def run(env: dict[str, str], sections: dict[str, dict[str, Any]], flags: dict[str, str]) -> None:
        path = scratch / "config.toml"
        path.write_text(_toml_document(sections), encoding="utf-8")
        full_env = {**env, "HOME": str(scratch), "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        try:
            config = Config(flags, env=full_env, config_file=str(path))
        except ConfigError as exc:
            assert SECRET_KEY not in str(exc)
            return
        for key in ("cache.size", "cache.block_size"):
            assert type(config[key]) is int and 0 <= config[key] <= MAX_SIZE
        # Precedence: a flag, else the first non-blank variable, else the file, else the default.
        if "cache_size" in flags:
            assert config.source("cache.size") == "--cache-size"
        elif env.get("SHOAL_CACHE_SIZE", "").strip():
            assert config.source("cache.size") == "env SHOAL_CACHE_SIZE"
            assert config["cache.size"] == parse_size(env["SHOAL_CACHE_SIZE"].strip())
        elif "size" in sections.get("cache", {}):
            assert config.source("cache.size") == f"file {path}"
        else:
            assert (config.source("cache.size"), config["cache.size"]) == ("default", CacheConfig().size_limit)
        assert config["sql.workers"] is None or (type(config["sql.workers"]) is int and config["sql.workers"] >= 1)
        assert type(config["s3.max_attempts"]) is int and config["s3.max_attempts"] >= 1
        assert config["sql.max_rows"] is None or (type(config["sql.max_rows"]) is int and config["sql.max_rows"] >= 0)
        for key in ("s3.connect_timeout", "s3.read_timeout"):
            assert math.isfinite(config[key]) and config[key] > 0
        assert config["sql.format"] in FORMATS
        assert type(config["cache.enabled"]) is bool and type(config["s3.anonymous"]) is bool
        for key in ("cache.dir", "sql.catalog", "s3.endpoint_url", "s3.region", "s3.profile", "sql.executor"):
            assert config[key] is None or (isinstance(config[key], str) and "\x00" not in config[key])
        try:
            cache = config.cache_config()
            assert cache.size_limit >= cache.block_size >= 4096
        except StorageConfigError:
            pass
        config.store_config()
        shown = json.dumps(config.show(), default=str)
        assert SECRET_KEY not in shown

    run()


# == sizes, cache directories, URLs ===========================================================

UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
         "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


@fuzz(400)
@given(value=st.one_of(st.text(max_size=30), st.sampled_from(TRICKY), st.integers(-2**70, 2**70), st.booleans(),
                       st.floats(allow_nan=True), st.from_regex(r"\s*[0-9]{1,25}(\.[0-9]{1,30})?\s*[a-zA-Z]{0,3}\s*",
                                                                fullmatch=True)))
def test_sizes_parse_to_an_int64_or_raise_storage_config_error(value: Any) -> None:
    try:
        size = parse_size(value)
    except StorageConfigError:
        return
    assert type(size) is int and 0 <= size <= MAX_SIZE


@fuzz(300)
@given(whole=st.integers(0, 10**13), fraction=st.one_of(st.none(), st.from_regex(r"[0-9]{1,12}", fullmatch=True)),
       unit=st.sampled_from(sorted(UNITS)), upper=st.booleans(), space=st.sampled_from(["", " ", "\t"]))
def test_sizes_are_exact(whole: int, fraction: str | None, unit: str, upper: bool, space: str) -> None:
    """``1.1GB`` is 1 100 000 000 bytes exactly (no float rounding), any case, any spacing."""
    number = f"{whole}.{fraction}" if fraction else str(whole)
    expected = math.floor(Fraction(number) * UNITS[unit])
    text = f"{space}{number}{space}{unit.upper() if upper else unit}{space}"
    if expected > MAX_SIZE:
        with pytest.raises(StorageConfigError, match="too large"):
            parse_size(text)
    else:
        assert parse_size(text) == expected


CACHE_ENV = st.dictionaries(
    st.sampled_from(["SHOAL_CACHE_DIR", "SHOAL_CACHE_SIZE", "SHOAL_CACHE_BLOCK_SIZE", "SHOAL_CACHE"]),
    st.one_of(ENV_VALUES, SIZES), max_size=4)


@fuzz(300)
@given(env=CACHE_ENV)
def test_cache_config_from_any_environment_builds_or_raises_storage_config_error(env: dict[str, str]) -> None:
    try:
        config = CacheConfig.from_env(env)
    except StorageConfigError:
        return
    assert config.block_size >= 4096 and not config.block_size & (config.block_size - 1)
    assert config.size_limit >= config.block_size and "\x00" not in str(config.directory)
    assert "~" not in str(config.directory)[:1]


@fuzz(400)
@given(url=st.one_of(st.text(max_size=40), st.from_regex(r"[A-Za-z0-9+]{0,6}://[/.a-z]{0,20}", fullmatch=True),
                     st.sampled_from(["s3://b/../../etc/passwd", "S3:///b/k", "file:///etc/passwd", "://", "s3a://",
                                      "http://http://x/y", "zip://a::file:///etc"])),
       endpoint=st.one_of(st.none(), st.text(max_size=20)), region=st.one_of(st.none(), st.text(max_size=10)))
def test_urls_split_without_errors_and_store_identity_holds_no_credentials(url: str, endpoint: str | None,
                                                                            region: str | None) -> None:
    protocol, rest = split_url(url)
    assert protocol == protocol.lower()
    if "://" not in url:
        assert (protocol, rest) == ("file", url)
    elif protocol in ("s3", "s3a"):
        assert not rest.startswith("/") and url.lower().startswith(protocol + "://")
    env = {"AWS_ENDPOINT_URL_S3": endpoint or "", "AWS_REGION": region or "", "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    store = StoreConfig.from_env(env, access_key="AKIDFUZZ", secret_key=SECRET_KEY)
    assert SECRET_KEY not in repr(store) and SECRET_KEY not in store.store_id


# == SQL ===================================================================================

TOKENS = ["SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "GROUP BY", "ORDER BY", "LIMIT", "UNION", "WITH", "AS",
          "JOIN", "ON", "(", ")", ",", ";", "*", "=", "<", "+", "'", '"', "--", "/*", "*/", "$$", "IN", "IS NULL",
          "EXPLAIN", "ANALYZE", "COPY", "TO", "CREATE", "VIEW", "OR REPLACE", "DROP", "DESCRIBE", "SHOW", "TABLES",
          "ATTACH", "DETACH", "SET", "RESET", "PRAGMA", "INSTALL", "LOAD", "CALL", "EXPORT DATABASE", "CHECKPOINT",
          "INSERT INTO", "VALUES", "DELETE", "UPDATE", "CREATE TABLE", "CREATE SECRET", "CREATE MACRO", "USE",
          "t", "x", "y", "1", "2.5", "'a'", "NULL", "range(3)", "count(*)", "sum(x)", "'/etc/passwd'",
          "read_text('/etc/passwd')", "glob('/etc/*')", "read_csv('/etc/passwd')", "'memory://m/x.parquet'",
          "enable_external_access", "true", "'\u00e9'", "\u2028"]
SQL = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12).map(" ".join)
#: Statement keywords Shoal never runs: any text starting with one is refused, never executed.
REFUSED = ("ATTACH", "DETACH", "SET", "RESET", "PRAGMA", "INSTALL", "LOAD", "CALL", "EXPORT", "CHECKPOINT",
           "INSERT", "DELETE", "UPDATE", "CREATE TABLE", "CREATE SECRET", "CREATE MACRO", "USE")


@pytest.fixture(scope="module")
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    yield connection
    connection.close()


def test_parse_trees_of_any_text(con: duckdb.DuckDBPyConnection) -> None:
    @fuzz(300)
    @given(text=st.one_of(SQL, st.text(max_size=60), st.text(st.characters(exclude_categories=()), max_size=20),
                          st.sampled_from(["SELECT '\udcff'", "\ud800", "SELECT 1 -- \udfff", "\x00"])))
    def run(text: str) -> None:
        try:
            tree = parse_tree(con, text)
        except SqlSyntaxError:
            return
        assert all(isinstance(n, str) for n in table_references(tree))
        assert all(isinstance(c, str) for c in column_references(tree))

    run()


PREDICATE_SOUP = st.lists(st.sampled_from(["x", "y", "z", "1", "'a'", "=", "<", ">", "AND", "OR", "NOT", "(", ")",
                                           "+", "IS NULL", "IN (1, 2)", "BETWEEN 1 AND 2", "UNION SELECT 2",
                                           "GROUP BY x", "ORDER BY 1", "LIMIT 1", ";", "SELECT", "(SELECT 1)",
                                           "LIKE 'a%'"]),
                          min_size=1, max_size=9).map(" ".join)
PREDICATE = st.recursive(
    st.sampled_from(["x = 1", "y < 2", "z IS NULL", "x IN (1, 2)", "y BETWEEN 1 AND 2", "z LIKE 'a;%'", "true",
                     "x = (SELECT 1)", "'a AND b' = z"]),
    lambda inner: st.one_of(st.tuples(inner, inner).map(lambda p: f"{p[0]} AND {p[1]}"),
                            st.tuples(inner, inner).map(lambda p: f"({p[0]}) AND ({p[1]})"),
                            st.tuples(inner, inner).map(lambda p: f"{p[0]} OR {p[1]}"),
                            inner.map(lambda p: f"NOT ({p})")),
    max_leaves=6)
#: What would turn a predicate into another statement: refused, never silently dropped.
NOT_A_PREDICATE = [" UNION SELECT 2", "; SELECT 2", " GROUP BY x", " ORDER BY 1", " LIMIT 1",
                   " UNION SELECT * FROM read_text('/etc/passwd')", "; ATTACH 'x.db'"]


def test_predicates_split_into_conjuncts_that_cover_them_or_raise_sql_syntax_error(
        con: duckdb.DuckDBPyConnection) -> None:
    """A predicate splits into parts whose AND is the same predicate (same columns,
    and it parses back to the same tree), or raises SqlSyntaxError: a suffix like
    ``UNION SELECT ...`` or ``; SELECT ...`` is refused, never dropped."""

    @fuzz(250)
    @given(drawn=st.one_of(PREDICATE.map(lambda p: (p, True)), PREDICATE_SOUP.map(lambda p: (p, False))),
           suffix=st.one_of(st.none(), st.sampled_from(NOT_A_PREDICATE)))
    def run(drawn: tuple[str, bool], suffix: str | None) -> None:
        predicate, plain = drawn
        if suffix is not None:
            with pytest.raises(SqlSyntaxError):
                top_level_conjuncts(con, predicate + suffix)
        try:
            parts = top_level_conjuncts(con, predicate)
        except SqlSyntaxError:
            assert not plain, f"a plain predicate was refused: {predicate!r}"
            return
        whole = parse_tree(con, f"SELECT 1 WHERE {predicate}")
        assert parts and column_references(whole) == set().union(*(cols for _, cols in parts))
        rejoined = parse_tree(con, "SELECT 1 WHERE " + " AND ".join(f"({sql})" for sql, _ in parts))
        normal = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(whole)]).fetchall()[0][0]
        again = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(rejoined)]).fetchall()[0][0]
        assert normal.replace("(", "").replace(")", "") == again.replace("(", "").replace(")", "")

    run()


SOURCES = ["range(3) t(x)", "(SELECT 1 AS x UNION ALL SELECT 2) t", "read_text('/etc/passwd') t(x)",
           "'/etc/passwd'", "glob('/etc/*') t(x)", "read_blob('/etc/passwd')", "'memory://fuzz/none.parquet'",
           "read_csv('http://127.0.0.1:9/x.csv')"]
QUERIES = st.builds(lambda e, src, where: f"SELECT {e} FROM {src}" + (f" WHERE {where}" if where else ""),
                    st.sampled_from(["x", "count(*)", "1", "x + 1", "*", "'a'"]), st.sampled_from(SOURCES),
                    st.one_of(st.none(), PREDICATE))
STATEMENTS = st.one_of(
    QUERIES, QUERIES.map("EXPLAIN {}".format), QUERIES.map("EXPLAIN ANALYZE {}".format),
    QUERIES.map(lambda q: f"COPY ({q}) TO 'memory://fuzz/out.parquet'"),
    QUERIES.map("CREATE OR REPLACE VIEW t AS {}".format),
    st.sampled_from(["SHOW TABLES", "DESCRIBE t", "DROP VIEW IF EXISTS t"]))
#: One statement of each type Shoal refuses by its DuckDB statement type, before running anything.
GATED_STATEMENTS = [
    "ATTACH ':memory:' AS m", "DETACH m", "USE memory", "SET threads = 1", "SET enable_external_access = true",
    "RESET enable_external_access", "SET allowed_directories = ['/']", "INSTALL httpfs", "LOAD httpfs",
    "LOAD '/tmp/evil.duckdb_extension'", "PRAGMA version", "CALL pragma_version()", "INSERT INTO t VALUES (1)",
    "UPDATE t SET x = 1", "DELETE FROM t", "EXPORT DATABASE '/tmp/shoal-fuzz-export'",
    "IMPORT DATABASE '/tmp/shoal-fuzz-export'", "CHECKPOINT", "VACUUM"]
#: CREATE / COPY statements other than CREATE VIEW and COPY (query) TO: refused when reached.
LATER_REFUSED = ["CREATE TABLE t2 AS SELECT 1", "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
                 "CREATE MACRO m(a) AS a", "COPY t FROM '/etc/passwd'", "CREATE VIEW \"../x\" AS SELECT 1"]
REFUSED_STATEMENTS = GATED_STATEMENTS + LATER_REFUSED


def test_the_statement_gate_refuses_everything_but_queries(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fuzzed statements (well-formed ones and token soup) through :meth:`Session.sql`
    on a locked-down session: a result, or an engine (or storage) error -- never
    another type; a statement starting with ATTACH, SET, INSTALL, PRAGMA,
    INSERT... is always a QueryError."""
    directory = tmp_path_factory.mktemp("gate")
    with Session(allowed_paths=(), cache=CacheConfig(directory=directory / "cache")) as session:

        @fuzz(150)
        @given(text=st.one_of(SQL, STATEMENTS, st.sampled_from(REFUSED_STATEMENTS)))
        def run(text: str) -> None:
            try:
                session.sql(text)
                refused = False
            except (EngineError, StorageError) as exc:
                refused = isinstance(exc, QueryError)
            finally:
                for name in ("t", "x", "y"):  # views a statement may have created
                    session.sql(f"DROP VIEW IF EXISTS {name}")
            if text.upper().lstrip().startswith(REFUSED) or text in REFUSED_STATEMENTS:
                assert refused, text

        run()
    assert sorted(os.listdir(directory)) == ["cache"]  # nothing was written anywhere else


@pytest.mark.parametrize("refused", REFUSED_STATEMENTS)
def test_a_refused_statement_anywhere_in_a_script_is_refused(refused: str, tmp_path: Path) -> None:
    """Hidden after (or before) a harmless statement, a refused one is still
    refused.  The gate looks at every statement's type before running any, so a
    script with ATTACH or SET in it runs nothing at all; CREATE TABLE / SECRET /
    MACRO and COPY ... FROM are refused when reached (what came before ran)."""
    with Session(cache=CacheConfig(directory=tmp_path / "cache")) as session:
        for script in (f"CREATE VIEW side AS SELECT 42 AS answer; {refused}",
                       f"{refused}; CREATE VIEW side AS SELECT 42 AS answer",
                       f"SELECT 1; {refused}; SELECT 2"):
            with pytest.raises(QueryError):
                session.sql(script)
            names = session.sql("SHOW TABLES").table.column("name").to_pylist()
            assert names == [] if refused in GATED_STATEMENTS or not script.startswith("CREATE VIEW side") else ["side"]
            session.sql("DROP VIEW IF EXISTS side")
        assert session.planner.con.execute("SELECT current_setting('threads')").fetchall() != [(1,)]
    assert sorted(os.listdir(tmp_path)) == ["cache"]
    assert not Path("/tmp/shoal-fuzz-export").exists()
