"""Tests for benchmarks/s3proxy.py: the latency/fault-injecting S3 proxy.

The proxy sits in front of moto's ThreadedMotoServer (in this process) and is
exercised with boto3 and s3fs.  Fixtures are local on purpose: they do not
depend on tests/conftest.py.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # benchmarks/ is scripts, not a package
import s3proxy  # noqa: E402
from latency_profiles import PROFILES, LatencyProfile  # noqa: E402

MiB = 1 << 20
BUCKET = "proxy-test"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client(url).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture()
def proxy(moto_url: str) -> Iterator[s3proxy.S3Proxy]:
    with s3proxy.S3Proxy(moto_url, profile="none", seed=1) as p:
        yield p


@pytest.fixture(scope="module")
def blob(moto_url: str) -> bytes:
    """A 5 MiB object stored directly in moto (not through the proxy)."""
    data = random.Random(7).randbytes(5 * MiB + 123)
    client(moto_url).put_object(Bucket=BUCKET, Key="blob.bin", Body=data)
    return data


def client(url: str, **config: Any) -> Any:
    # "max_attempts" counts retries, not attempts: 1 would still retry once.
    config.setdefault("retries", {"total_max_attempts": 1})
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="x",
        aws_secret_access_key="y",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, **config),
    )


def control(proxy: s3proxy.S3Proxy, name: str, method: str = "GET", body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{proxy.url}/__shoal_proxy__/{name}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


# --------------------------------------------------------------- round trips
def test_boto3_roundtrip_put_and_ranged_get(proxy: s3proxy.S3Proxy, moto_url: str) -> None:
    data = random.Random(1).randbytes(6 * MiB + 17)
    c = client(proxy.url)
    c.put_object(Bucket=BUCKET, Key="rt.bin", Body=data)
    # What moto stored (read directly) is exactly what went through the proxy.
    assert client(moto_url).get_object(Bucket=BUCKET, Key="rt.bin")["Body"].read() == data
    assert c.get_object(Bucket=BUCKET, Key="rt.bin")["Body"].read() == data
    for start, end in [(0, 0), (1, MiB), (3 * MiB + 5, 6 * MiB + 16), (len(data) - 10, len(data) - 1)]:
        got = c.get_object(Bucket=BUCKET, Key="rt.bin", Range=f"bytes={start}-{end}")
        assert got["Body"].read() == data[start : end + 1]
    assert c.head_object(Bucket=BUCKET, Key="rt.bin")["ContentLength"] == len(data)


def test_boto3_multipart_upload(proxy: s3proxy.S3Proxy, moto_url: str) -> None:
    from boto3.s3.transfer import TransferConfig

    data = random.Random(2).randbytes(11 * MiB)
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    client(proxy.url).upload_fileobj(io.BytesIO(data), BUCKET, "mpu.bin", Config=cfg)
    assert client(moto_url).get_object(Bucket=BUCKET, Key="mpu.bin")["Body"].read() == data


def test_s3fs_roundtrip(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(endpoint_url=proxy.url, key="x", secret="y", skip_instance_cache=True)
    data = random.Random(3).randbytes(3 * MiB + 1)
    fs.pipe(f"{BUCKET}/fs.bin", data)
    assert fs.cat_file(f"{BUCKET}/fs.bin") == data
    assert fs.cat_file(f"{BUCKET}/blob.bin", start=MiB, end=3 * MiB + 7) == blob[MiB : 3 * MiB + 7]
    with fs.open(f"{BUCKET}/blob.bin", "rb", block_size=MiB) as f:
        f.seek(2 * MiB - 3)
        assert f.read(MiB) == blob[2 * MiB - 3 : 3 * MiB - 3]
    assert proxy.stats()["gets"] >= 3


# ------------------------------------------------------------------ counters
def test_get_counter_and_control_path(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    c = client(proxy.url)
    c.head_object(Bucket=BUCKET, Key="blob.bin")  # not a GET
    proxy.reset_stats()
    for i in range(7):
        c.get_object(Bucket=BUCKET, Key="blob.bin", Range=f"bytes={i * 1000}-{i * 1000 + 999}")["Body"].read()
    c.head_object(Bucket=BUCKET, Key="blob.bin")
    c.put_object(Bucket=BUCKET, Key="small", Body=b"abc")
    stats = proxy.stats()
    assert stats["gets"] == 7
    assert stats["requests_by_method"] == {"GET": 7, "HEAD": 1, "PUT": 1}
    assert stats["requests"] == 9
    assert stats["responses_by_status"]["206"] == 7
    assert stats["bytes_sent"] > 7000  # bodies plus headers
    assert stats["bytes_received"] >= 3
    assert stats["connections_opened"] >= 1
    assert stats["seed"] == 1 and stats["profile"] == "none"
    # The HTTP control path reports the same counters and is not counted.
    assert control(proxy, "stats")["gets"] == 7
    assert control(proxy, "reset", "POST", {}) == {"reset": True}
    after = control(proxy, "stats")
    assert after["gets"] == 0 and after["requests"] == 0 and after["bytes_sent"] == 0


def test_control_path_sets_faults_and_profile(proxy: s3proxy.S3Proxy) -> None:
    assert control(proxy, "faults", "POST", {"slowdown_rate": 0.25})["slowdown_rate"] == 0.25
    assert proxy.faults.slowdown_rate == 0.25
    prof = control(proxy, "profile", "POST", {"name": "wan", "tail": [[0.5, 1, 2]]})
    assert prof["name"] == "wan" and proxy.profile.tail == ((0.5, 1, 2),)
    with pytest.raises(urllib.error.HTTPError) as err:
        control(proxy, "nope")
    assert err.value.code == 404


# -------------------------------------------------------------------- faults
def test_injected_503_slowdown(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    c = client(proxy.url)
    proxy.set_faults(slowdown_rate=1.0)
    with pytest.raises(ClientError) as err:
        c.get_object(Bucket=BUCKET, Key="blob.bin")
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    with pytest.raises(ClientError):  # PUT with a body: the body is drained or the connection closed
        c.put_object(Bucket=BUCKET, Key="x503", Body=b"z" * 100_000)
    assert proxy.stats()["faults"]["slowdown"] == 2
    proxy.set_faults(slowdown_rate=0.0)
    assert c.get_object(Bucket=BUCKET, Key="blob.bin", Range="bytes=0-9")["Body"].read() == blob[:10]


def test_only_get_faults(proxy: s3proxy.S3Proxy) -> None:
    c = client(proxy.url)
    proxy.set_faults(slowdown_rate=1.0, only_get=True)
    c.put_object(Bucket=BUCKET, Key="onlyget", Body=b"hello")
    c.head_object(Bucket=BUCKET, Key="onlyget")
    with pytest.raises(ClientError):
        c.get_object(Bucket=BUCKET, Key="onlyget")


STREAM_ERRORS = (BotoCoreError, ConnectionError, http.client.HTTPException, OSError)


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_cut_mid_body_is_an_error_not_wrong_bytes(proxy: s3proxy.S3Proxy, blob: bytes, kind: str) -> None:
    import urllib3

    proxy.set_faults(**{f"{kind}_rate": 1.0}, body_fraction=0.5)
    resp = client(proxy.url).get_object(Bucket=BUCKET, Key="blob.bin")
    with pytest.raises(STREAM_ERRORS + (urllib3.exceptions.HTTPError,)):
        data = resp["Body"].read()
        pytest.fail(f"{kind}: read returned {len(data)} bytes instead of raising")
    assert proxy.stats()["faults"][kind] == 1


def test_reset_mid_body_s3fs(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(endpoint_url=proxy.url, key="x", secret="y", skip_instance_cache=True)
    fs.retries = 2  # s3fs retries broken bodies; every try is reset here
    proxy.set_faults(reset_rate=1.0, only_get=True)
    with pytest.raises(Exception) as err:
        data = fs.cat_file(f"{BUCKET}/blob.bin", start=0, end=2 * MiB)
        pytest.fail(f"read returned {len(data)} bytes instead of raising")
    assert proxy.stats()["faults"]["reset"] >= 2


def test_first_byte_stall_times_out_client(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    proxy.set_faults(stall_rate=1.0, stall_s=5.0)
    c = client(proxy.url, read_timeout=0.2, connect_timeout=1)
    t = time.perf_counter()
    with pytest.raises(BotoCoreError):  # ReadTimeoutError
        c.get_object(Bucket=BUCKET, Key="blob.bin", Range="bytes=0-9")
    assert time.perf_counter() - t < 4.0  # the client gave up; it did not wait out the stall
    assert proxy.stats()["faults"]["stall"] == 1


# ------------------------------------------------------ latency and bandwidth
def test_bandwidth_cap_enforced(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    proxy.set_profile(LatencyProfile(name="cap", bandwidth_bytes_per_s=8 * MiB))
    c = client(proxy.url)
    proxy.reset_stats()
    t = time.perf_counter()
    data = c.get_object(Bucket=BUCKET, Key="blob.bin", Range=f"bytes=0-{4 * MiB - 1}")["Body"].read()
    elapsed = time.perf_counter() - t
    assert data == blob[: 4 * MiB]
    assert proxy.stats()["bytes_sent"] >= 4 * MiB
    assert elapsed >= 0.4, f"4 MiB at 8 MiB/s took only {elapsed:.3f} s"


def test_aggregate_cap_shared_by_connections(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    proxy.set_profile(LatencyProfile(name="agg", aggregate_bytes_per_s=8 * MiB))
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            got = client(proxy.url).get_object(Bucket=BUCKET, Key="blob.bin", Range=f"bytes=0-{2 * MiB - 1}")
            assert got["Body"].read() == blob[: 2 * MiB]
        except BaseException as exc:  # surface in the main thread
            errors.append(exc)

    t = time.perf_counter()
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert time.perf_counter() - t >= 0.4  # 4 MiB in all at 8 MiB/s shared


def test_ttfb_applied(proxy: s3proxy.S3Proxy, blob: bytes) -> None:
    c = client(proxy.url)
    proxy.set_profile(LatencyProfile(name="fixed", ttfb_median_s=0.15))
    t = time.perf_counter()
    c.get_object(Bucket=BUCKET, Key="blob.bin", Range="bytes=0-9")["Body"].read()
    assert time.perf_counter() - t >= 0.15


def test_ttfb_sampler_median_matches_s3_standard() -> None:
    profile = PROFILES["s3-standard"]
    rng = random.Random(1)
    draws = [profile.sample_ttfb(rng) for _ in range(2000)]
    assert abs(statistics.median(draws) - 0.027) <= 0.1 * 0.027
    slow = sum(d >= 0.2 for d in draws) / len(draws)
    assert 0.015 <= slow <= 0.05  # the 3% tail is there
    assert all(d > 0 for d in draws)
    # Same seed, same draws.
    assert [profile.sample_ttfb(random.Random(1)) for _ in range(3)] == [draws[0]] * 3


def test_profiles_are_valid() -> None:
    assert {"none", "s3-standard", "s3-express", "lan-minio", "wan"} <= set(PROFILES)
    std = PROFILES["s3-standard"]
    assert std.bandwidth_bytes_per_s == 60 * MiB and std.aggregate_bytes_per_s == 1.25e9
    assert std.connect_delay_s == 0.001
    assert PROFILES["none"].sample_ttfb(random.Random(0)) == 0.0
    assert PROFILES["none"].sample_bandwidth(random.Random(0)) is None
    with pytest.raises(ValueError):
        LatencyProfile(tail=((0.6, 0, 1), (0.6, 0, 1)))
    with pytest.raises(TypeError):
        LatencyProfile(0.1)  # type: ignore[misc]  # keyword-only


# ------------------------------------------------------- byte-exact framing
def test_raw_bytes_forwarded_exactly_with_chunked_both_ways() -> None:
    """Host header, odd headers and chunked framing pass through untouched."""
    canned = (
        b"HTTP/1.1 200 OK\r\nX-Odd:   spaced  \r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    received = bytearray()
    srv = socket.create_server(("127.0.0.1", 0))

    def upstream() -> None:
        conn, _ = srv.accept()
        with conn:
            while not received.endswith(b"0\r\n\r\n"):
                received.extend(conn.recv(65536))
            conn.sendall(canned)
            conn.recv(1)  # wait for the proxy to close

    th = threading.Thread(target=upstream, daemon=True)
    th.start()
    request = (
        b"PUT /bkt/key?x=1 HTTP/1.1\r\nHost: signed-for.example:1234\r\nx-amz-date: 20260101T000000Z\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    with s3proxy.S3Proxy(f"http://127.0.0.1:{srv.getsockname()[1]}") as p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(request)
            got = b""
            while not got.endswith(b"X-Trailer: t\r\n\r\n"):
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
    th.join(5)
    srv.close()
    assert bytes(received) == request
    assert got == canned


# ---------------------------------------------------------- overhead, CLI
def test_measure_overhead_runs(moto_url: str) -> None:
    result = s3proxy.measure_overhead(moto_url, n=3, size=256 * 1024)
    assert result["ratio_median"] > 0 and result["in_process_proxy"]
    assert set(result["median_s"]) == {"direct", "proxy"}


def test_cli_subprocess(moto_url: str, blob: bytes) -> None:
    cmd = [sys.executable, str(BENCH_DIR / "s3proxy.py"), "--upstream", moto_url, "--listen", "127.0.0.1:0",
           "--profile", "s3-standard", "--seed", "1", "--error-rate", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("LISTENING "), line
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        got = client(url).get_object(Bucket=BUCKET, Key="blob.bin", Range="bytes=10-19")
        assert got["Body"].read() == blob[10:20]
        with urllib.request.urlopen(f"{url}/__shoal_proxy__/stats", timeout=10) as resp:
            stats = json.loads(resp.read())
        assert stats["gets"] == 1 and stats["seed"] == 1 and stats["profile"] == "s3-standard"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "seed=1" in err
