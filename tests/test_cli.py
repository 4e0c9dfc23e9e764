"""The ``shoal`` executable, run in subprocesses: outputs, config precedence, cache commands, errors.

Every test runs the installed console script (or ``python -m shoal.cli.main``)
with an isolated HOME, config and cache directory, over Parquet files written
to ``tmp_path`` or uploaded to a real S3 server (SeaweedFS and moto, see
conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3servers import S3Endpoint, free_port

_SCRIPT = Path(sys.executable).with_name("shoal")
SHOAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "shoal.cli.main"]
COUNT_LINE = re.compile(r"^\d+ rows? in \d+\.\d\d s$")

ROWS = [
    {"id": 1, "name": "ann", "score": 1.5},
    {"id": 2, "name": "bob", "score": 2.25},
    {"id": 3, "name": "cy, jr", "score": None},
    {"id": 4, "name": "dee", "score": 4.0},
]
CSV = 'id,name,score\n1,ann,1.5\n2,bob,2.25\n3,"cy, jr",\n4,dee,4.0\n'


def people() -> pa.Table:
    return pa.Table.from_pylist(ROWS, schema=pa.schema([("id", pa.int64()), ("name", pa.string()),
                                                         ("score", pa.float64())]))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: own HOME, cache dir, no config file, no AWS or SHOAL settings."""
    home = tmp_path / "home"
    home.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHOAL_", "XDG_"))}
    clean.update(
        HOME=str(home),
        SHOAL_CACHE_DIR=str(tmp_path / "cache"),
        AWS_CONFIG_FILE=str(home / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        SHOAL_WORKERS="2",
    )
    return clean


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "people.parquet"
    pq.write_table(people(), path)
    return path


def shoal(*args: str, env: dict[str, str], input: str | None = None, timeout: float = 60,
          cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SHOAL, *args], env=env, input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int, *, secret: str | None = None,
                          contains: str = "") -> str:
    """Exit status ``code``, exactly one stderr line ``shoal: error: ...``, no traceback, no secret."""
    assert result.returncode == code, f"exit {result.returncode}, wanted {code}\nstderr:\n{result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr has {len(lines)} lines:\n{result.stderr}"
    assert lines[0].startswith("shoal: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert contains.lower() in lines[0].lower(), lines[0]
    if secret:
        assert secret not in result.stdout + result.stderr
    return lines[0]


# -- output formats -----------------------------------------------------------------------------


def test_csv_output_is_exact_and_count_goes_to_stderr(env: dict[str, str], data: Path) -> None:
    result = ok(shoal("sql", "--format", "csv", f"SELECT * FROM '{data}' ORDER BY id", env=env))
    assert result.stdout == CSV
    assert COUNT_LINE.match(result.stderr.strip()) and result.stderr.startswith("4 rows in ")


def test_json_lines_parse_to_the_rows(env: dict[str, str], data: Path) -> None:
    result = ok(shoal("sql", "--format", "json", "--table", f"people={data}",
                      "SELECT id, name, score, score * 2 AS double_score FROM people ORDER BY id", env=env))
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [{**r, "double_score": None if r["score"] is None else r["score"] * 2} for r in ROWS]
    assert result.stderr.startswith("4 rows in ")


def test_table_output_is_aligned_with_null(env: dict[str, str], data: Path) -> None:
    result = ok(shoal("sql", f"SELECT * FROM '{data}' ORDER BY id", env=env))
    lines = result.stdout.splitlines()
    assert re.match(r"^\| +id \| name +\| +score \|$", lines[1]), result.stdout
    body = [line for line in lines if line.startswith("|")][1:]
    assert [re.split(r"\s*\|\s*", line)[1:4] for line in body] == [
        ["1", "ann", "1.5"], ["2", "bob", "2.25"], ["3", "cy, jr", "NULL"], ["4", "dee", "4.0"]]
    assert len({len(line) for line in lines}) == 1          # every line equally wide
    assert result.stderr.startswith("4 rows in ")           # not a terminal: count on stderr


def test_parquet_output_file(env: dict[str, str], data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = ok(shoal("sql", "--format", "parquet", "--output", str(out),
                      f"SELECT id, name FROM '{data}' WHERE id >= 2 ORDER BY id", env=env))
    assert result.stdout == ""
    assert result.stderr.startswith("3 rows in ")
    assert pq.read_table(out).to_pylist() == [{"id": r["id"], "name": r["name"]} for r in ROWS[1:]]
    assert_one_error_line(shoal("sql", "--format", "parquet", "SELECT 1", env=env), 2, contains="--output")


def test_csv_to_output_file_keeps_stdout_empty(env: dict[str, str], data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = ok(shoal("sql", "--format", "csv", "-o", str(out), f"SELECT * FROM '{data}' ORDER BY id", env=env))
    assert result.stdout == ""
    assert out.read_text() == CSV
    assert result.stderr.startswith("4 rows in ")


def test_max_rows_truncates_and_says_so(env: dict[str, str], data: Path) -> None:
    result = ok(shoal("sql", "--format", "csv", "--max-rows", "2", f"SELECT * FROM '{data}' ORDER BY id", env=env))
    assert result.stdout == "".join(CSV.splitlines(keepends=True)[:3])
    assert "truncated to 2 of 4 rows" in result.stderr
    result = ok(shoal("sql", "--format", "json", "--max-rows", "1", f"SELECT * FROM '{data}' ORDER BY id", env=env))
    assert [json.loads(line) for line in result.stdout.splitlines()] == ROWS[:1]


def test_script_with_several_statements(env: dict[str, str], data: Path, tmp_path: Path) -> None:
    script = tmp_path / "script.sql"
    script.write_text(f"""
        -- a view, then two queries; the ';' inside the string does not end a statement
        CREATE VIEW people AS SELECT * FROM '{data}';
        SELECT count(*) AS n FROM people;
        /* block comment */
        SELECT name, 'a;b' AS s FROM people WHERE id = 2;
    """)
    result = ok(shoal("sql", "--format", "json", "-f", str(script), env=env))
    assert [json.loads(line) for line in result.stdout.splitlines()] == [{"n": 4}, {"name": "bob", "s": "a;b"}]
    status = result.stderr.splitlines()
    assert status[0].startswith("created view people")
    assert COUNT_LINE.match(status[1]) and COUNT_LINE.match(status[2])


def test_statements_from_a_pipe(env: dict[str, str], data: Path) -> None:
    result = ok(shoal("--format", "csv", "--table", f"p={data}",
                      input="SELECT max(id) AS m\nFROM p;\nSELECT 'x' AS y;\n", env=env))
    assert result.stdout == "m\n4\ny\nx\n"


def test_profile_goes_to_stderr(env: dict[str, str], data: Path) -> None:
    result = ok(shoal("sql", "--format", "csv", "--profile", "--workers", "1",
                      f"SELECT sum(id) AS s FROM '{data}'", env=env))
    assert result.stdout == "s\n10\n"
    assert re.search(r"^Shoal plan: \w+ executor, 1 (worker|DuckDB thread)\(s\)$", result.stderr, re.M), result.stderr
    assert "stages:" in result.stderr


# -- tables and catalog ------------------------------------------------------------------------------


def test_table_flags_catalog_and_config_tables(env: dict[str, str], data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [7, 8]}), other)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[tables.people]\nurl = "{data}"\n\n[tables.shadowed]\nurl = "{data}"\n')
    config = tmp_path / "config.toml"
    config.write_text(f'[tables]\nfrom_config = "{other}"\n')
    env = {**env, "SHOAL_CONFIG": str(config)}
    args = ["--catalog", str(catalog), "--table", f"shadowed={other}", "--format", "json"]

    listed = [json.loads(line) for line in ok(shoal("tables", *args, env=env)).stdout.splitlines()]
    assert [(t["name"], t["url"], t["source"].split()[0]) for t in listed] == [
        ("from_config", str(other), "file"), ("people", str(data), "catalog"), ("shadowed", str(other), "--table")]

    result = ok(shoal("sql", *args, "SELECT (SELECT count(*) FROM people) AS p, (SELECT sum(x) FROM shadowed) AS s, "
                      "(SELECT count(*) FROM from_config) AS c", env=env))
    assert json.loads(result.stdout) == {"p": 4, "s": 15, "c": 2}


def test_catalog_from_environment(env: dict[str, str], data: Path, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[tables]\npeople = "{data}"\n')
    result = ok(shoal("sql", "--format", "csv", "SELECT count(*) AS n FROM people",
                      env={**env, "SHOAL_CATALOG": str(catalog)}))
    assert result.stdout == "n\n4\n"


# -- configuration ------------------------------------------------------------------------------------


def _shown(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return json.loads(ok(result).stdout)


def test_config_precedence_flag_env_file(env: dict[str, str], data: Path, tmp_path: Path) -> None:
    config = tmp_path / "conf" / "config.toml"
    config.parent.mkdir()
    config.write_text('[cache]\ndir = "file-cache"\nsize = "2GB"\n[sql]\nworkers = 3\nformat = "json"\n'
                      '[s3]\nregion = "eu-file-1"\n')
    base = {k: v for k, v in env.items() if k not in ("SHOAL_CACHE_DIR", "SHOAL_WORKERS")}
    base["SHOAL_CONFIG"] = str(config)

    shown = _shown(shoal("config", "show", "--json", env=base))
    assert shown["cache.dir"] == {"value": str(config.parent / "file-cache"), "source": f"file {config}"}
    assert shown["cache.size"]["value"] == 2_000_000_000
    assert shown["sql.workers"] == {"value": 3, "source": f"file {config}"}
    assert shown["s3.region"]["value"] == "eu-file-1"

    with_env = {**base, "SHOAL_CACHE_DIR": str(tmp_path / "env-cache"), "SHOAL_WORKERS": "2",
                "AWS_REGION": "eu-env-1"}
    shown = _shown(shoal("config", "show", "--json", env=with_env))
    assert shown["cache.dir"] == {"value": str(tmp_path / "env-cache"), "source": "env SHOAL_CACHE_DIR"}
    assert shown["sql.workers"] == {"value": 2, "source": "env SHOAL_WORKERS"}
    assert shown["s3.region"] == {"value": "eu-env-1", "source": "env AWS_REGION"}
    assert shown["sql.format"] == {"value": "json", "source": f"file {config}"}

    shown = _shown(shoal("config", "show", "--json", "--cache-dir", str(tmp_path / "flag-cache"),
                         "--workers", "1", "--region", "eu-flag-1", env=with_env))
    assert shown["cache.dir"] == {"value": str(tmp_path / "flag-cache"), "source": "--cache-dir"}
    assert shown["sql.workers"] == {"value": 1, "source": "--workers"}
    assert shown["s3.region"] == {"value": "eu-flag-1", "source": "--region"}

    # The observable effect: worker count in the profile, output format, cache directory used.
    query = f"SELECT count(*) AS n FROM '{data}'"
    for extra_env, flags, workers in (({}, [], 3), ({"SHOAL_WORKERS": "2"}, ["--workers", "1"], 1)):
        result = ok(shoal("sql", "--profile", *flags, query, env={**base, **extra_env}))
        assert json.loads(result.stdout) == {"n": 4}        # format = "json" from the file
        assert re.search(rf" executor, {workers} (worker|DuckDB thread)\(s\)", result.stderr), result.stderr
    stats = json.loads(ok(shoal("cache", "stats", "--json", env=with_env)).stdout)
    assert stats["directory"] == str(tmp_path / "env-cache")


def test_config_file_with_a_secret_is_rejected(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[s3]\nendpoint_url = "http://127.0.0.1:1"\nsecret_key = "s3cr3t-in-the-file"\n')
    line = assert_one_error_line(shoal("sql", "SELECT 1", env={**env, "SHOAL_CONFIG": str(config)}), 2,
                                 secret="s3cr3t-in-the-file", contains="credential chain")
    assert "secret_key" in line


def test_config_show_never_prints_credentials(env: dict[str, str]) -> None:
    secret, key = "wJalrXUtnFEMI-K7MDENG-bPxRfiCY", "AKIAIOSFODNN7EXAMPLE"
    creds = {**env, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    text = ok(shoal("config", "show", env=creds)).stdout
    assert secret not in text and key not in text
    assert re.search(r"^s3\.secret_key +\*\*\* +\(env AWS_SECRET_ACCESS_KEY\)$", text, re.M), text
    shown = _shown(shoal("config", "show", "--json", env=creds))
    assert shown["s3.access_key"]["value"] == "***"


def test_bad_config_values_are_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    assert_one_error_line(shoal("sql", "SELECT 1", env={**env, "SHOAL_WORKERS": "many"}), 2, contains="sql.workers")
    config = tmp_path / "config.toml"
    config.write_text("[cache]\ncolour = 'blue'\n")
    assert_one_error_line(shoal("sql", "SELECT 1", env={**env, "SHOAL_CONFIG": str(config)}), 2, contains="colour")
    assert_one_error_line(shoal("sql", "SELECT 1", env={**env, "SHOAL_CONFIG": str(tmp_path / "none.toml")}), 2,
                          contains="not found")


# -- errors (local) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code", "contains"), [
    (["sql", "SELEC 1"], 2, "syntax error"),
    (["sql", "SELECT * FROM no_such_table"], 2, "no_such_table"),
    (["sql", "SELECT nope FROM people"], 2, "nope"),
    (["sql", "SELECT * FROM '{tmp}/missing.parquet'"], 1, "not found"),
    (["sql", "SELECT * FROM '{tmp}/notes.parquet'"], 1, "not a parquet file"),
    (["sql", "--table", "bad name=x.parquet", "SELECT 1"], 2, "invalid table name"),
    (["sql", "-f", "{tmp}/no-script.sql"], 2, "cannot read script"),
    (["sql", "--format", "xml", "SELECT 1"], 2, "sql.format"),
    (["sql", "--bogus-flag", "SELECT 1"], 2, "unrecognized"),
    (["sql", "--format", "csv", "-o", "{tmp}/no-dir/out.csv", "SELECT 1"], 1, "cannot write"),
])
def test_local_errors_are_one_line(env: dict[str, str], data: Path, tmp_path: Path, args: list[str], code: int,
                                   contains: str) -> None:
    (tmp_path / "notes.parquet").write_text("just some text, not parquet\n" * 4)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = shoal("--table", f"people={data}", *args, env=env)
    assert_one_error_line(result, code, contains=contains)
    assert result.stdout == ""


def test_debug_shows_the_traceback(env: dict[str, str]) -> None:
    result = shoal("sql", "--debug", "SELEC 1", env=env)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("shoal: error: SQL syntax error")


def _wait_for_cpu(pid: int, seconds: float, timeout: float = 30.0) -> None:
    """Until process ``pid`` has used ``seconds`` of CPU (a plain sleep where /proc is missing)."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        time.sleep(seconds + 1)
        return
    ticks = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks >= seconds:   # utime + stime
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not start its query within {timeout} s")


def test_sigint_cancels_a_one_shot_query(env: dict[str, str]) -> None:
    proc = subprocess.Popen([*SHOAL, "sql", "SELECT sum(hash(range)) FROM range(3000000000)"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_cpu(proc.pid, seconds=1.5)           # imports take ~0.4 s of CPU: the query is running
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "shoal: error: query cancelled"
    assert stdout == ""
    assert time.monotonic() - started < 5


# -- S3 ----------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_env(env: dict[str, str], s3_endpoint: S3Endpoint) -> dict[str, str]:
    return {**env, "AWS_ACCESS_KEY_ID": s3_endpoint.access_key, "AWS_SECRET_ACCESS_KEY": s3_endpoint.secret_key,
            "AWS_ENDPOINT_URL_S3": s3_endpoint.endpoint_url, "AWS_REGION": s3_endpoint.region,
            "SHOAL_S3_MAX_ATTEMPTS": "2", "SHOAL_S3_CONNECT_TIMEOUT": "2"}


def _put_parquet(client: Any, bucket: str, key: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())


@pytest.fixture
def s3_people(s3_client: Any, s3_bucket: str) -> str:
    """Two Parquet objects under ``s3://bucket/people/``; returns that prefix."""
    _put_parquet(s3_client, s3_bucket, "people/part-0.parquet", people().slice(0, 2))
    _put_parquet(s3_client, s3_bucket, "people/part-1.parquet", people().slice(2))
    s3_client.put_object(Bucket=s3_bucket, Key="notes.parquet", Body=b"not parquet at all, " * 8)
    return f"s3://{s3_bucket}/people/"


def _stats(env: dict[str, str]) -> dict[str, Any]:
    return json.loads(ok(shoal("cache", "stats", "--json", env=env)).stdout)


def test_s3_query_then_warm_run_hits_the_cache(s3_env: dict[str, str], s3_people: str) -> None:
    query = ["sql", "--format", "csv", "--table", f"people={s3_people}", "SELECT * FROM people ORDER BY id"]
    assert ok(shoal(*query, env=s3_env)).stdout == CSV
    cold = _stats(s3_env)["all_processes"]
    assert cold["store_requests"] > 0 and cold["misses"] > 0

    assert ok(shoal(*query, env=s3_env)).stdout == CSV
    stats = _stats(s3_env)
    warm = stats["all_processes"]
    assert warm["store_requests"] == cold["store_requests"]        # nothing fetched from the store
    assert warm["hits"] > cold["hits"]
    assert stats["entries"] > 0 and stats["volume"] > 0
    assert stats["directory"] == s3_env["SHOAL_CACHE_DIR"]


def test_s3_cache_warm_then_clear(s3_env: dict[str, str], s3_people: str) -> None:
    warm = ok(shoal("cache", "warm", "--table", f"people={s3_people}", "people", env=s3_env)).stdout
    assert re.match(r"^warmed 2 objects, .* fetched from the store, 0 B already cached", warm), warm
    warmed = _stats(s3_env)
    assert warmed["entries"] == 2 and warmed["all_processes"]["misses"] == 2

    result = ok(shoal("sql", "--format", "json", "--profile", f"SELECT count(*) AS n FROM '{s3_people}*.parquet'",
                      env=s3_env))
    assert json.loads(result.stdout) == {"n": 4}
    assert re.search(r"from store \(0 GETs\)", result.stderr), result.stderr     # all from the warmed cache

    assert ok(shoal("cache", "clear", env=s3_env)).stdout.startswith("removed ")
    result = ok(shoal("sql", "--no-cache", "--format", "csv", f"SELECT count(*) AS n FROM '{s3_people}*.parquet'",
                      env=s3_env))
    assert result.stdout == "n\n4\n"
    cleared = _stats(s3_env)
    assert cleared["entries"] == 0                                  # cleared, and --no-cache stored nothing
    assert cleared["all_processes"]["hits"] == 0


def test_s3_copy_to_writes_parquet(s3_env: dict[str, str], s3_people: str, s3_client: Any, s3_bucket: str) -> None:
    result = ok(shoal("sql", f"COPY (SELECT id FROM '{s3_people}*.parquet' WHERE id > 2 ORDER BY id) "
                             f"TO 's3://{s3_bucket}/out/ids.parquet' (FORMAT parquet)", env=s3_env))
    assert result.stdout == ""
    assert f"wrote 2 rows to s3://{s3_bucket}/out/ids.parquet" in result.stderr
    body = s3_client.get_object(Bucket=s3_bucket, Key="out/ids.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(body)).to_pylist() == [{"id": 3}, {"id": 4}]


@pytest.mark.parametrize("case", ["missing-bucket", "missing-key", "not-parquet", "wrong-credentials", "unreachable"])
def test_s3_errors_are_one_line_without_secrets(case: str, s3_env: dict[str, str], s3_endpoint: S3Endpoint,
                                                s3_people: str, s3_bucket: str) -> None:
    env = dict(s3_env)
    url, contains = f"{s3_people}part-0.parquet", ""
    if case == "missing-bucket":
        url, contains = "s3://shoal-no-such-bucket-4242/x.parquet", "bucket does not exist"
    elif case == "missing-key":
        url, contains = f"s3://{s3_bucket}/people/nothing-here.parquet", "not found"
    elif case == "not-parquet":
        url, contains = f"s3://{s3_bucket}/notes.parquet", "not a parquet file"
    elif case == "wrong-credentials":
        if s3_endpoint.name == "moto":
            pytest.skip("moto accepts any credentials")
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-" + s3_endpoint.secret_key
        contains = "access denied"
    elif case == "unreachable":
        env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{free_port()}"
        env["SHOAL_S3_MAX_ATTEMPTS"] = "1"
        contains = "cannot reach"
    started = time.monotonic()
    result = shoal("sql", f"SELECT * FROM '{url}'", env=env)
    assert_one_error_line(result, 1, secret=env["AWS_SECRET_ACCESS_KEY"], contains=contains)
    assert s3_endpoint.secret_key not in result.stderr
    assert time.monotonic() - started < 20



# -- in-process units of the CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "statements", "complete"), [
    ("SELECT 1", ["SELECT 1"], False),
    ("SELECT 1;", ["SELECT 1"], True),
    ("SELECT 1; SELECT 2;\n", ["SELECT 1", "SELECT 2"], True),
    ("SELECT ';' AS s;", ["SELECT ';' AS s"], True),
    ("SELECT 'it''s; fine'", ["SELECT 'it''s; fine'"], False),
    ('SELECT 1 AS "a;b";', ['SELECT 1 AS "a;b"'], True),
    ("-- note; not a statement\nSELECT 1;", ["SELECT 1"], True),
    ("/* ; */ SELECT 2; -- trailing; comment", ["SELECT 2"], True),
    ("SELECT 'open", ["SELECT 'open"], False),
    ("SELECT $$ ; $$;", ["SELECT $$ ; $$"], True),
    ("", [], True),
    (" ;; ", [], True),
])
def test_statement_splitting(text: str, statements: list[str], complete: bool) -> None:
    from shoal.cli.statements import is_complete, split_statements

    assert split_statements(text) == statements
    assert is_complete(text) is complete


def test_error_classification() -> None:
    from shoal.cache import BucketNotFoundError, StorageConfigError
    from shoal.cli.errors import classify
    from shoal.engine import BindError, NotParquetError, QueryCancelled, SqlSyntaxError

    assert classify(SqlSyntaxError("SQL syntax error: x")) == (2, "SQL syntax error: x")
    assert classify(BindError("Binder Error: column y\nLINE 1: ...")) == (2, "column y LINE 1: ...")
    assert classify(StorageConfigError("bad size"))[0] == 2
    assert classify(BucketNotFoundError(2, "bucket does not exist: b")) == (1, "bucket does not exist: b")
    assert classify(NotParquetError("not a Parquet file: f"))[0] == 1
    assert classify(QueryCancelled("query cancelled")) == (130, "query cancelled")
    assert classify(KeyboardInterrupt()) == (130, "interrupted")
    assert classify(RuntimeError("boom\nmore")) == (
        1, "unexpected RuntimeError: boom more (run with --debug for details)")
