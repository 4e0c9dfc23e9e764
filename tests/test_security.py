"""Hostile access: peers without the cluster secret, secrets in logs and outputs,
SQL that reaches for local files or other URLs, and path traversal.

Real components throughout: block servers and ``shoal worker`` processes on
loopback, SeaweedFS with real credentials (it rejects wrong ones), the
``shoal`` executable, DuckDB.  What the transport conformance suite already
covers is not repeated here (a client with the wrong secret gets
UNAVAILABLE, a server that cannot prove the secret gets no request, requests
before authentication are refused).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3servers
from test_transport_helpers import SECRET, raw_connect, raw_handshake, read_until_closed

from shoal.cache import BlockCache, CacheConfig, StorageConfigError, StorageError, StoreConfig
from shoal.cli.errors import classify
from shoal.engine import AccessNotAllowedError, CatalogError, EngineError, QueryError, Session, TableDef
from shoal.engine.security import allowed_paths_from_env, check_source, lock_down
from shoal.transport import (
    BlockRequest, BlockServer, MemoryProvider, Origin, Outcome, ServerConfig, TcpTransport, load_secret,
)
from shoal.transport import _io
from shoal.transport.messages import Hello, encode_get
from shoal.transport.protocol import NONCE_BYTES, Limits, MsgType, auth_mac, decode_header, encode_frame
from shoal.transport.server import CLIENT_LABEL
from shoal.transport.worker import Worker

_SCRIPT = Path(sys.executable).with_name("shoal")
SHOAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "shoal.cli.main"]
DATA = b"the cluster's private block " * 40


def _forms(secret: str | bytes) -> list[str]:
    """The secret as text, hex and base64: none of them may show up anywhere."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return [raw.decode("latin-1"), raw.hex(), base64.b64encode(raw).decode()]


def _assert_absent(secret: str | bytes, *texts: str) -> None:
    for form in _forms(secret):
        for text in texts:
            assert form not in text, f"secret found in: {text[:200]!r}"


def _frames(stream: bytes) -> list[MsgType]:
    types = []
    while len(stream) >= 32:
        header = decode_header(stream[:32])
        types.append(header.type)
        stream = stream[32 + header.meta_len + header.payload_len:]
    return types


@pytest.fixture
def server() -> Iterator[BlockServer]:
    provider = MemoryProvider()
    provider.put("k", DATA, token="v1")
    srv = BlockServer(provider, SECRET, config=ServerConfig(max_block=1 << 20, handshake_timeout=0.5))
    srv.start()
    yield srv
    srv.close()


# == peers ========================================================================================


def test_a_replayed_handshake_is_refused(server: BlockServer) -> None:
    """An eavesdropper who recorded a whole valid handshake cannot replay it: the
    server's nonce is fresh on every connection, so the recorded proof is wrong."""
    sock = raw_connect(server.address)
    hello_frame = encode_frame(MsgType.HELLO, 0, Hello(secrets.token_bytes(NONCE_BYTES), 0, 1 << 20, 0, "c").encode())
    sock.sendall(hello_frame)
    _, challenge = _io.read_frame(sock, Limits(max_payload=0))
    hello = hello_frame[32:]
    auth_frame = encode_frame(MsgType.AUTH, 0, auth_mac(SECRET, CLIENT_LABEL, (hello, challenge)))
    sock.sendall(auth_frame)
    assert _io.read_frame(sock, Limits(max_payload=0))[0].type is MsgType.AUTH_OK
    sock.close()

    replay = raw_connect(server.address)
    meta, flags = encode_get(BlockRequest("k", "v1", len(DATA)))
    replay.sendall(hello_frame)
    header, fresh = _io.read_frame(replay, Limits(max_payload=0))
    assert header.type is MsgType.CHALLENGE and fresh[:NONCE_BYTES] != challenge[:NONCE_BYTES]
    try:
        replay.sendall(auth_frame + encode_frame(MsgType.GET, 1, meta, flags=flags))
    except OSError:
        pass
    answer = read_until_closed(replay)
    replay.close()
    assert _frames(answer) == [MsgType.ERROR] and DATA[:32] not in answer
    assert server.metrics.auth_failures == 1 and server.metrics.requests == 0


def test_after_a_failed_proof_the_connection_yields_nothing(server: BlockServer) -> None:
    """A peer with the wrong secret that keeps talking after its AUTH (GET, PING,
    STATS pipelined behind it) receives the CHALLENGE and one ERROR, then EOF:
    no block, no PONG, no server statistics."""
    wrong = b"not-the-cluster-secret-0123456789"
    sock = raw_connect(server.address)
    hello = Hello(secrets.token_bytes(NONCE_BYTES), 0, 1 << 20, 0, "intruder").encode()
    sock.sendall(encode_frame(MsgType.HELLO, 0, hello))
    header, challenge = _io.read_frame(sock, Limits(max_payload=0))
    assert header.type is MsgType.CHALLENGE
    meta, flags = encode_get(BlockRequest("k", "v1", len(DATA)))
    follow = (encode_frame(MsgType.AUTH, 0, auth_mac(wrong, CLIENT_LABEL, (hello, challenge)))
              + encode_frame(MsgType.GET, 1, meta, flags=flags) + encode_frame(MsgType.PING, 2, b"hi")
              + encode_frame(MsgType.STATS, 3))
    try:
        sock.sendall(follow)
    except OSError:
        pass
    answer = read_until_closed(sock)
    sock.close()
    types = _frames(answer)
    assert MsgType.ERROR in types and set(types) == {MsgType.ERROR}
    assert DATA[:32] not in answer and b"server" not in answer  # no STATS_REPLY JSON either
    assert server.metrics.auth_failures == 1 and server.metrics.requests == 0


@pytest.mark.parametrize("sent", [b"", encode_frame(MsgType.HELLO, 0, b"x" * 60)[:40]], ids=["silent", "half-hello"])
def test_a_peer_that_never_finishes_the_handshake_is_dropped(server: BlockServer, sent: bytes) -> None:
    sock = raw_connect(server.address, timeout=10)
    sock.sendall(sent)
    answer = read_until_closed(sock, timeout=10)  # the server hangs up after handshake_timeout (0.5 s)
    sock.close()
    assert DATA[:32] not in answer and MsgType.CHALLENGE not in _frames(answer)
    assert server.metrics.requests == 0


def test_the_cluster_secret_is_never_logged_or_shown(server: BlockServer, caplog: pytest.LogCaptureFixture,
                                                     tmp_path: Path) -> None:
    """Everything a cluster does with its secret -- loading it from a file (with a
    permissions warning), good and failed handshakes from both sides, a fetch,
    STATS over the wire, metrics and reprs -- at DEBUG: the secret (as text, hex
    or base64) appears nowhere."""
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o644)
    assert load_secret(secret_file) == SECRET  # warns: readable by others
    good, intruder = TcpTransport(SECRET), TcpTransport(b"not-the-cluster-secret-0123456789")
    try:
        buffer = memoryview(bytearray(len(DATA)))
        request = BlockRequest("k", "v1", len(DATA))
        assert good.fetch(server.address, [request], [buffer], timeout=10) == [Outcome.FILLED]
        assert intruder.fetch(server.address, [BlockRequest("k", "v1", len(DATA))], [memoryview(bytearray(len(DATA)))],
                              timeout=10) == [Outcome.UNAVAILABLE]
        impostor = BlockServer(MemoryProvider(), b"an-impostor-without-the-secret-00", config=ServerConfig())
        impostor.start()
        try:
            assert good.fetch(impostor.address, [BlockRequest("k", "v1", 1)], [memoryview(bytearray(1))],
                              timeout=10) == [Outcome.UNAVAILABLE]
        finally:
            impostor.close()
        sock = raw_handshake(server.address)
        sock.sendall(encode_frame(MsgType.STATS, 9))
        header, stats = _io.read_frame(sock, Limits(max_payload=0))
        sock.close()
        assert header.type is MsgType.STATS_REPLY
        shown = [stats.decode(), json.dumps(server.stats(), default=str), json.dumps(good.metrics.snapshot()),
                 repr(server), repr(good), repr(server.config), repr(good.config), caplog.text]
    finally:
        good.close()
        intruder.close()
    assert "readable by others" in caplog.text and "failed authentication" in caplog.text
    _assert_absent(SECRET, *shown)
    _assert_absent(b"not-the-cluster-secret-0123456789", caplog.text)


def test_a_worker_process_never_prints_its_secret(tmp_path: Path) -> None:
    """``shoal worker`` at DEBUG, visited by a peer with the right secret and one
    with a wrong secret, then stopped: its whole output never holds the secret."""
    secret = base64.b64encode(secrets.token_bytes(32))
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_bytes(secret + b"\n")
    secret_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "AWS_"))}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:  # a file, not a pipe: a chatty DEBUG log never blocks the worker
        proc = subprocess.Popen([*SHOAL, "worker", "--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path / "cache"),
                                 "--secret-file", str(secret_file), "--transport", "tcp", "--log-level", "DEBUG"],
                                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("shoal worker listening on "), line + log.read_text()
        address = line.split()[4]
        friend, intruder = TcpTransport(secret), TcpTransport(b"not-the-cluster-secret-0123456789")
        try:
            buffer = memoryview(bytearray(10))
            assert friend.fetch(address, [BlockRequest("nothing-here:0", "t", 10)], [buffer], timeout=10) == [
                Outcome.NOT_FOUND]
            assert intruder.fetch(address, [BlockRequest("nothing-here:0", "t", 10)], [buffer], timeout=10) == [
                Outcome.UNAVAILABLE]
        finally:
            friend.close()
            intruder.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "failed authentication" in err  # the DEBUG log was on and saw the intruder
    _assert_absent(secret, out, err)


# == object-store credentials ====================================================================

_CREDENTIAL_KINDS = ["external"] if s3servers.external_from_env() is not None else ["seaweedfs"]


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


@pytest.fixture
def stored(s3_endpoint: Any, s3_client: Any, s3_bucket: str) -> str:
    s3_client.put_object(Bucket=s3_bucket, Key="t/part-0.parquet", Body=_parquet(pa.table({"x": [1, 2, 3]})))
    return f"s3://{s3_bucket}/t/"


def _store(endpoint: Any, secret_key: str | None = None) -> StoreConfig:
    return StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                       secret_key=secret_key or endpoint.secret_key, region=endpoint.region, max_attempts=2,
                       connect_timeout=2.0)


def _exception_text(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc)), classify(exc)[1]])


@pytest.mark.parametrize("s3_endpoint", _CREDENTIAL_KINDS, indirect=True)
def test_credentials_never_reach_logs_errors_explain_profiles_or_metrics(
        s3_endpoint: Any, stored: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Queries, EXPLAIN, EXPLAIN ANALYZE, the profile, cache statistics and
    metrics with the right secret key; access denied with a wrong one (a real
    SeaweedFS checks it); all with every logger at DEBUG (botocore included):
    neither secret key appears in any of it."""
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_hex(16)
    query = f"SELECT sum(x) AS s FROM '{stored}*.parquet'"
    shown: list[str] = []
    with Session(store=_store(s3_endpoint), cache=CacheConfig(directory=tmp_path / "cache"), executor="threads",
                 workers=2) as session:
        result = session.sql(query)
        assert result.table.to_pylist() == [{"s": 6}]
        for text in (f"EXPLAIN {query}", f"EXPLAIN ANALYZE {query}"):
            shown += [session.sql(text).message or ""]
        shown += [session.explain(query), session.explain(query, analyze=True), repr(result.profile),
                  json.dumps(result.profile.to_dict(), default=str), json.dumps(session.cache_stats(), default=str),
                  json.dumps(session.fs.reader.metrics.snapshot(), default=str), repr(session.fs),
                  repr(session.fs.store_config), json.dumps(session.fs.stats(), default=str)]
        for url in (f"{stored}../../../etc/passwd", "s3://../../etc/passwd"):  # traversal in keys: a store error
            with pytest.raises(StorageError) as traversal:
                session.sql(f"SELECT * FROM '{url}'")
            shown.append(_exception_text(traversal.value))
            assert "root:" not in str(traversal.value)
    with Session(store=_store(s3_endpoint, wrong), cache=CacheConfig(directory=tmp_path / "cold")) as session:
        with pytest.raises(StorageError, match="access denied") as denied:
            session.sql(query)
        shown.append(_exception_text(denied.value))
    assert any(r.name.startswith("botocore") for r in caplog.records)  # the net was cast wide
    for secret in (s3_endpoint.secret_key, wrong):
        _assert_absent(secret, caplog.text, *shown)


def _run(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHOAL_", "XDG_"))}
    env.update(HOME=str(home), SHOAL_CACHE_DIR=str(tmp_path / "cache"), SHOAL_WORKERS="2",
               AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


@pytest.mark.parametrize("s3_endpoint", _CREDENTIAL_KINDS, indirect=True)
def test_the_cli_never_prints_credentials_even_with_debug(s3_endpoint: Any, stored: str,
                                                          cli_env: dict[str, str]) -> None:
    """``shoal --debug`` (debug logs, botocore at INFO, tracebacks) running
    EXPLAIN ANALYZE with ``--profile``, ``cache stats --json`` and ``config show
    --json``, then a query with a wrong secret key: no output holds either key."""
    env = {**cli_env, "AWS_ACCESS_KEY_ID": s3_endpoint.access_key, "AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_key,
           "AWS_ENDPOINT_URL_S3": s3_endpoint.endpoint_url, "AWS_REGION": s3_endpoint.region,
           "SHOAL_S3_MAX_ATTEMPTS": "2"}
    query = f"SELECT sum(x) AS s FROM '{stored}*.parquet'"
    runs = [_run("--debug", "sql", "--profile", "--format", "csv", query, env=env),
            _run("--debug", "sql", f"EXPLAIN ANALYZE {query}", env=env),
            _run("cache", "stats", "--json", env=env),
            _run("--debug", "config", "show", "--json", env=env)]
    assert [r.returncode for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]
    assert runs[0].stdout == "s\n6\n" and "scan s3://" in runs[1].stdout + runs[1].stderr
    assert json.loads(runs[2].stdout)["all_processes"]["store_requests"] > 0
    assert json.loads(runs[3].stdout)["s3.secret_key"]["value"] == "***"
    wrong = "wrong-" + secrets.token_hex(16)
    denied = _run("--debug", "sql", query, env={**env, "AWS_SECRET_ACCESS_KEY": wrong})
    assert denied.returncode == 1 and "access denied" in denied.stderr
    assert "Traceback" in denied.stderr  # --debug printed it (redacted)
    for secret in (s3_endpoint.secret_key, wrong):
        _assert_absent(secret, *(r.stdout + r.stderr for r in [*runs, denied]))


# == what SQL may reach =============================================================================


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An HTTP server that serves a Parquet file and CSV and counts every request."""

    hits: list[str] = []
    body = _parquet(pa.table({"x": [7]}))

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web() -> Iterator[tuple[str, list[str]]]:
    """``http://127.0.0.1:PORT`` of a recording server, and its list of requests."""
    hits: list[str] = []
    handler = type("Handler", (_Recorder,), {"hits": hits})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """``ok/`` (allowed, holds a.parquet and a symlink to a file outside), ``ok2/`` next
    to it, and ``private/salary-list.parquet`` outside."""
    for folder in ("ok", "ok2", "private"):
        (tmp_path / folder).mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "ok" / "a.parquet")
    pq.write_table(pa.table({"x": [2]}), tmp_path / "ok2" / "b.parquet")
    pq.write_table(pa.table({"x": [3]}), tmp_path / "private" / "salary-list.parquet")
    (tmp_path / "ok" / "link.parquet").symlink_to(tmp_path / "private" / "salary-list.parquet")
    return tmp_path


READS = [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_json('/etc/passwd')",
    "SELECT * FROM parquet_metadata('/etc/passwd')",
    "SELECT * FROM sniff_csv('/etc/passwd')",
    "SELECT * FROM 'file:///etc/passwd'",
    "SELECT * FROM read_parquet(['{tmp}/ok/a.parquet', '{tmp}/private/salary-list.parquet'])",
    "SELECT * FROM '{tmp}/ok2/b.parquet'",                 # a sibling whose name starts like the allowed one
    "SELECT * FROM '{tmp}/ok/link.parquet'",               # a symlink inside pointing outside
    "SELECT * FROM duckdb_secrets()",                      # reads ~/.duckdb/stored_secrets
    "SELECT * FROM read_csv('{web}/x.csv')",
    "SELECT * FROM read_parquet('{web}/x.parquet')",
    "SELECT * FROM read_text('{web}/x.txt')",
    "COPY (SELECT 1 AS x) TO '{tmp}/private/out.parquet'",
    "COPY (SELECT 1 AS x) TO '{web}/upload.csv'",
]


@pytest.mark.parametrize("executor", ["local", "threads"])
def test_locked_sql_reaches_no_local_file_or_url_outside_the_allowed_paths(
        sandbox: Path, web: tuple[str, list[str]], executor: str) -> None:
    url, hits = web
    with Session(executor=executor, allowed_paths=[str(sandbox / "ok")],
                 cache=CacheConfig(directory=sandbox / "cache")) as session:
        assert session.sql(f"SELECT * FROM '{sandbox}/ok/a.parquet'").table.to_pylist() == [{"x": 1}]
        session.sql("CREATE VIEW sneaky AS SELECT * FROM read_text('/etc/passwd')")
        for template in [*READS, "SELECT * FROM sneaky"]:
            query = template.format(tmp=sandbox, web=url)
            with pytest.raises(AccessNotAllowedError, match="not allowed") as info:
                session.sql(query)
            assert "root:" not in str(info.value)
    assert hits == []
    assert not (sandbox / "private" / "out.parquet").exists()


def test_the_lock_cannot_be_lifted_from_duckdb_itself(tmp_path: Path) -> None:
    """Defence in depth under the statement gate: on a locked connection DuckDB
    itself refuses to re-enable external access, widen the allowed directories,
    attach a database or load an extension."""
    con = duckdb.connect()
    lock_down(con, [str(tmp_path / "it's ok")], ("s3", "memory"))
    for statement in ("SET enable_external_access = true", "RESET enable_external_access",
                      "SET allowed_directories = ['/']", "SET allowed_paths = ['/etc/passwd']",
                      f"ATTACH '{tmp_path}/x.db'", "INSTALL httpfs", "LOAD httpfs",
                      "SELECT * FROM read_text('/etc/passwd')"):
        with pytest.raises(duckdb.Error):
            con.execute(statement).fetchall()
    assert con.execute("SELECT current_setting('enable_external_access')").fetchall() == [(False,)]
    assert not (tmp_path / "x.db").exists()
    con.close()


def test_allowed_paths_from_the_environment() -> None:
    assert allowed_paths_from_env({}) is None
    assert allowed_paths_from_env({"SHOAL_ALLOWED_PATHS": "  "}) is None
    assert allowed_paths_from_env({"SHOAL_ALLOWED_PATHS": " None "}) == ()
    assert allowed_paths_from_env({"SHOAL_ALLOWED_PATHS": f"/a{os.pathsep}{os.pathsep}/b"}) == ("/a", "/b")


def test_table_sources_are_checked_before_anything_is_listed(sandbox: Path) -> None:
    """:func:`check_source`: with allowed paths, only Shoal's object stores and
    local paths (and globs) under them; ``..``, symlinks and sibling prefixes do
    not escape, other schemes are refused; without allowed paths nothing is."""
    protocols = ("s3", "s3a", "memory")
    ok = str(sandbox / "ok")
    for url in ("s3://b/k.parquet", "S3A://b/*", "memory://x/y", f"{ok}/a.parquet", f"{ok}/*.parquet",
                f"file://{ok}/a.parquet", f"{ok}/../ok/a.parquet", ok):
        check_source(url, [ok], protocols)
    for url in ("/etc/passwd", "file:///etc/passwd", f"{ok}/../private/salary-list.parquet",
                f"{ok}/*/../../private/*", f"{sandbox}/ok2/b.parquet", f"{ok}/link.parquet", f"{ok}/a\x00b",
                "http://127.0.0.1:1/x.parquet", "http://http://127.0.0.1:1/x", "ftp://h/x", "zip://a::file:///etc"):
        with pytest.raises(AccessNotAllowedError) as info:
            check_source(url, [ok], protocols)
        assert "salary" not in str(info.value).replace(url, "")
    check_source("/etc/passwd", None, protocols)  # unrestricted: DuckDB's own default
    with pytest.raises(AccessNotAllowedError):
        check_source("/etc/passwd", (), protocols)


def test_locked_sql_makes_no_request_through_shoals_own_filesystem(sandbox: Path,
                                                                     web: tuple[str, list[str]]) -> None:
    url, hits = web
    with Session(allowed_paths=[str(sandbox / "ok")], cache=CacheConfig(directory=sandbox / "cache")) as session:
        for query in (f"SELECT * FROM '{url.replace('http://', 'http://http://')}/x.parquet'",
                      f"SELECT * FROM '{sandbox}/private/*'"):
            with pytest.raises(AccessNotAllowedError) as info:
                session.sql(query)
            assert "salary" not in str(info.value)  # not even the name of a file outside
    assert hits == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # FTPFileSystem.__del__
def test_unknown_url_schemes_are_an_engine_or_storage_error(tmp_path: Path) -> None:
    with Session(cache=CacheConfig(directory=tmp_path / "cache")) as session:
        for url in ("ftp://127.0.0.1:1/x.parquet", "gcs://bucket/x.parquet", "zip://x::file:///etc/passwd"):
            with pytest.raises((EngineError, StorageError, StorageConfigError)):
                session.sql(f"SELECT * FROM '{url}'")


@pytest.mark.parametrize("statement", [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_csv('{web}/x.csv')",
    "COPY (SELECT 1 AS x) TO '{tmp}/private/out.csv'",
    "SET enable_external_access = true",
    "INSTALL httpfs",
    "ATTACH '{tmp}/private/x.db'",
    "PRAGMA version",
])
def test_sql_from_the_cli_is_locked_by_shoal_allowed_paths(statement: str, sandbox: Path, cli_env: dict[str, str],
                                                            web: tuple[str, list[str]]) -> None:
    url, hits = web
    env = {**cli_env, "SHOAL_ALLOWED_PATHS": str(sandbox / "ok")}
    result = _run("sql", statement.format(tmp=sandbox, web=url), env=env)
    assert result.returncode in (1, 2) and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), result.stderr
    assert "not allowed" in lines[0] or "not supported" in lines[0]
    assert "root:" not in result.stderr and hits == []
    assert sorted(p.name for p in (sandbox / "private").iterdir()) == ["salary-list.parquet"]


def test_the_cli_reads_inside_shoal_allowed_paths(sandbox: Path, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "SHOAL_ALLOWED_PATHS": str(sandbox / "ok")}
    result = _run("sql", "--format", "csv", f"SELECT x FROM '{sandbox}/ok/a.parquet'", env=env)
    assert (result.returncode, result.stdout) == (0, "x\n1\n"), result.stderr


# == path traversal ==============================================================================

TRAVERSALS = ["../x", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".", "x;DROP TABLE y", "a b", "\x00", "~root"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_table_names_cannot_be_paths(name: str, tmp_path: Path) -> None:
    with pytest.raises(CatalogError):
        TableDef(name=name, url="s3://b/t/")
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[tables]\n{json.dumps(name)} = "s3://b/t/"\n', encoding="utf-8")
    with Session(cache=CacheConfig(directory=tmp_path / "cache")) as session:
        with pytest.raises(CatalogError):
            session.register(name, "s3://b/t/")
        with pytest.raises(CatalogError):
            session.catalog.load_toml(catalog)
        quoted = '"' + name.replace('"', '""') + '"'
        with pytest.raises(QueryError):
            session.sql(f"CREATE VIEW {quoted} AS SELECT 1 AS x")
        assert session.tables() == []
    assert sorted(os.listdir(tmp_path)) == ["cache", "catalog.toml"]


def test_cache_keys_never_name_files(tmp_path: Path) -> None:
    """Block keys are looked up in the cache's index, never used as file names:
    hostile keys store and load their own bytes, every file stays inside the
    cache directory, and a key naming a host file finds nothing."""
    cache = BlockCache(CacheConfig(directory=tmp_path / "cache", block_size=4096, size_limit=16 << 20))
    try:
        assert cache.get("/etc/passwd") is None and cache.open_block("../../etc/passwd") is None
        for n, key in enumerate(TRAVERSALS + ["../" * 20 + "tmp/shoal-escape", str(tmp_path / "outside")]):
            data = bytes([n]) * (64 << 10)  # large enough to live in its own file
            assert cache.put(key, data)
            assert bytes(cache.get(key) or b"") == data
    finally:
        cache.close()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(p.is_relative_to(tmp_path / "cache") for p in files)
    assert not Path("/tmp/shoal-escape").exists() and not (tmp_path / "outside").exists()


def test_a_peer_cannot_make_a_worker_read_or_name_local_files(tmp_path: Path) -> None:
    """GETs for keys that look like paths, and fill requests whose origin is a
    local file or a traversing S3 key with a key that does not match it: never
    FILLED, nothing read outside the worker's cache."""
    worker = Worker(listen="127.0.0.1:0", secret=SECRET, cache=CacheConfig(directory=tmp_path / "cache"),
                    store=StoreConfig(endpoint_url="http://127.0.0.1:1", max_attempts=1), mode="tcp")
    address = worker.start()
    client = TcpTransport(SECRET)
    try:
        size = os.path.getsize("/etc/passwd")
        requests = [BlockRequest(key, "t", size) for key in ("/etc/passwd", "../../etc/passwd", "file:///etc/passwd")]
        for url in ("/etc/passwd", "file:///etc/passwd", "s3://b/../../etc/passwd", "s3://../etc/passwd"):
            for store_id in ("file", "http://127.0.0.1:1"):
                origin = Origin(store_id=store_id, url=url, size=size, block_size=1 << 20, index=0)
                requests.append(BlockRequest("/etc/passwd", "t", size, origin))
        buffers = [memoryview(bytearray(size)) for _ in requests]
        outcomes = client.fetch(address, requests, buffers, timeout=10)
        assert outcomes and all(o in (Outcome.NOT_FOUND, Outcome.REJECTED) for o in outcomes), outcomes
        assert all(not any(b) for b in buffers)
    finally:
        client.close()
        worker.close()
    assert all(p.is_relative_to(tmp_path / "cache") for p in tmp_path.rglob("*"))


def test_a_script_with_a_refused_statement_runs_none_of_it(tmp_path: Path) -> None:
    """Refusal is decided for the whole script first: nothing before the refused
    statement has run (no view created, no file written)."""
    target = tmp_path / "out.parquet"
    with Session(cache=CacheConfig(directory=tmp_path / "cache")) as session:
        for refused in ("CREATE TABLE t (x INTEGER)", "CREATE MACRO m(a) AS a", "COPY t FROM 'x.csv'"):
            script = f"CREATE VIEW early AS SELECT 1 AS x; COPY (SELECT 1 AS x) TO '{target}'; {refused}"
            with pytest.raises(QueryError):
                session.sql(script)
            assert "early" not in session.sql("SHOW TABLES").table.column("name").to_pylist()
            assert not target.exists()
