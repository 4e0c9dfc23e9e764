"""Shared pytest fixtures: real S3 servers (SeaweedFS, moto, or SHOAL_TEST_S3_ENDPOINT).

Fixtures:

* ``s3_endpoint`` (session): an :class:`s3servers.S3Endpoint`, parametrized
  ``seaweedfs`` / ``moto``, or just ``external`` when ``SHOAL_TEST_S3_ENDPOINT``
  is set. Servers start lazily, once per session. Tests using it get the ``s3`` marker.
* ``s3_client`` (function): a boto3 S3 client for ``s3_endpoint``.
* ``s3_bucket`` (function): name of a fresh, empty bucket, emptied and deleted afterwards.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s3servers  # noqa: E402
from s3servers import S3Endpoint  # noqa: E402

# A test run started in the background without job control (`pytest &` in a
# script) ignores SIGINT, and so would every `shoal` process the tests start:
# the Ctrl-C tests need it delivered, as a terminal does.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_EXTERNAL = s3servers.external_from_env()
_ENDPOINT_KINDS = ["external"] if _EXTERNAL is not None else ["seaweedfs", "moto"]


@pytest.fixture(scope="session", autouse=True)
def _isolate_aws_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep the host's AWS configuration (profiles, keys, endpoints, region) out of tests.

    Session-scoped so it also covers the session fixtures that start servers.
    """
    aws_dir = tmp_path_factory.mktemp("no-aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):  # incl. PROFILE, keys, ENDPOINT_URL[_S3], REGION
                mp.delenv(name)
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "missing-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "missing-credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


class _ServerPool:
    """Starts each kind of server on first use and stops them all at session end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._endpoints: dict[str, S3Endpoint] = {}
        self._stops: list[Any] = []
        self._errors: dict[str, str] = {}

    def get(self, kind: str) -> S3Endpoint:
        if kind in self._errors:  # don't retry a failed server for every test
            pytest.fail(f"{kind} S3 server failed to start earlier: {self._errors[kind]}")
        if kind not in self._endpoints:
            try:
                if kind == "seaweedfs":
                    ep, stop = s3servers.start_seaweedfs(self._tmp.mktemp("seaweedfs"))
                elif kind == "moto":
                    ep, stop = s3servers.start_moto()
                elif kind == "external" and _EXTERNAL is not None:
                    ep, stop = _EXTERNAL, None
                else:
                    raise ValueError(f"unknown S3 server kind {kind!r}")
            except Exception as exc:
                self._errors[kind] = repr(exc)
                raise
            self._endpoints[kind] = ep
            if stop is not None:
                self._stops.append(stop)
        return self._endpoints[kind]

    def close(self) -> None:
        for stop in reversed(self._stops):
            stop()
        self._stops.clear()


@pytest.fixture(scope="session")
def _s3_server_pool(
    _isolate_aws_env: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_ServerPool]:
    pool = _ServerPool(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session", params=_ENDPOINT_KINDS)
def s3_endpoint(request: pytest.FixtureRequest, _s3_server_pool: _ServerPool) -> S3Endpoint:
    """A running S3 server: ``seaweedfs`` and ``moto``, or ``external`` from env."""
    return _s3_server_pool.get(request.param)


@pytest.fixture
def s3_client(s3_endpoint: S3Endpoint) -> Any:
    """A boto3 S3 client for ``s3_endpoint``."""
    return s3_endpoint.boto3_client()


@pytest.fixture
def s3_bucket(
    request: pytest.FixtureRequest, s3_endpoint: S3Endpoint, s3_client: Any
) -> Iterator[str]:
    """A fresh, uniquely named bucket; emptied and deleted after the test."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"shoal-{slug}-{secrets.token_hex(6)}" if slug else f"shoal-{secrets.token_hex(6)}"
    s3servers.create_bucket(s3_client, name, s3_endpoint.region)
    s3_client.get_waiter("bucket_exists").wait(
        Bucket=name, WaiterConfig={"Delay": 0.2, "MaxAttempts": 50}
    )
    try:
        yield name
    finally:
        s3servers.empty_and_delete_bucket(s3_client, name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use ``s3_endpoint`` (directly or via other fixtures) get ``@pytest.mark.s3``."""
    for item in items:
        if "s3_endpoint" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


# -- TPC-H SF 0.01 (engine, Ray executor and Ray cluster tests) ---------------------------


@pytest.fixture(scope="session")
def tpch_dir() -> Path:
    """Local Parquet TPC-H data at SF 0.01 (generated once, see tests/tpch_fixtures.py)."""
    from tpch_fixtures import generate

    return generate(0.01)


@pytest.fixture(scope="session")
def reference(tpch_dir: Path) -> dict[str, list[tuple]]:
    """DuckDB's answers to the 22 queries over the local files."""
    from tpch_fixtures import answers, queries

    con = answers.connect_reference(tpch_dir)
    return {name: answers.reference_results(tpch_dir, sql, con) for name, sql in queries().items()}
