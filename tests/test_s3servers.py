"""Checks that the S3 test servers behave like S3 in the ways Shoal relies on."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
import s3fs
from botocore.exceptions import ClientError

from s3servers import S3Endpoint

PAYLOAD = bytes(range(256)) * 64  # 16 KiB, every byte value


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code"))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def test_put_get_boto3(s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="dir/a.bin", Body=PAYLOAD)
    got = s3_client.get_object(Bucket=s3_bucket, Key="dir/a.bin")
    assert got["Body"].read() == PAYLOAD
    assert got["ContentLength"] == len(PAYLOAD)
    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="dir/")
    assert [o["Key"] for o in listed["Contents"]] == ["dir/a.bin"]


def test_put_get_s3fs(s3_endpoint: S3Endpoint, s3_client: Any, s3_bucket: str) -> None:
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_endpoint.storage_options())
    path = f"{s3_bucket}/dir/b.bin"
    fs.pipe(path, PAYLOAD)
    assert fs.cat(path) == PAYLOAD
    assert fs.cat_file(path, start=100, end=110) == PAYLOAD[100:110]
    assert fs.info(path)["size"] == len(PAYLOAD)
    # written through s3fs, visible through boto3 and vice versa
    assert s3_client.get_object(Bucket=s3_bucket, Key="dir/b.bin")["Body"].read() == PAYLOAD
    s3_client.put_object(Bucket=s3_bucket, Key="dir/c.bin", Body=b"hello")
    fs.invalidate_cache()
    assert sorted(fs.ls(f"{s3_bucket}/dir", detail=False)) == [path, f"{s3_bucket}/dir/c.bin"]
    with fs.open(f"{s3_bucket}/dir/c.bin", "rb") as f:
        assert f.read() == b"hello"


def test_wrong_credentials_rejected(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    if s3_endpoint.name == "moto":
        pytest.skip("moto accepts any credentials (no authentication)")
    bad_secret = dataclasses.replace(s3_endpoint, secret_key=s3_endpoint.secret_key + "x")
    bad_key = dataclasses.replace(s3_endpoint, access_key="NOSUCHKEY" + os.urandom(4).hex().upper())
    denied = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}
    for ep in (bad_secret, bad_key):
        client = ep.boto3_client(retries={"max_attempts": 1})
        with pytest.raises(ClientError) as info:
            client.list_objects_v2(Bucket=s3_bucket)
        assert _error_code(info.value) in denied
        with pytest.raises(ClientError) as info:
            client.put_object(Bucket=s3_bucket, Key="x", Body=b"x")
        assert _error_code(info.value) in denied
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **ep.storage_options())
        with pytest.raises((PermissionError, OSError)):
            fs.pipe(f"{s3_bucket}/y", b"y")


def test_ranged_get(s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="r.bin", Body=PAYLOAD)
    cases = {"bytes=0-0": PAYLOAD[:1], "bytes=1000-1999": PAYLOAD[1000:2000],
             f"bytes={len(PAYLOAD) - 10}-": PAYLOAD[-10:], "bytes=-7": PAYLOAD[-7:]}
    for rng, want in cases.items():
        got = s3_client.get_object(Bucket=s3_bucket, Key="r.bin", Range=rng)
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206, rng
        assert got["Body"].read() == want, rng
        assert got["ContentLength"] == len(want), rng
        assert got["ContentRange"].endswith(f"/{len(PAYLOAD)}"), rng


def test_get_if_match(s3_client: Any, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="m.bin", Body=PAYLOAD)
    etag = s3_client.head_object(Bucket=s3_bucket, Key="m.bin")["ETag"]
    got = s3_client.get_object(Bucket=s3_bucket, Key="m.bin", IfMatch=etag)
    assert got["Body"].read() == PAYLOAD
    got = s3_client.get_object(Bucket=s3_bucket, Key="m.bin", IfMatch=etag, Range="bytes=0-9")
    assert got["Body"].read() == PAYLOAD[:10]
    wrong = '"0123456789abcdef0123456789abcdef"'
    for extra in ({}, {"Range": "bytes=0-9"}):
        with pytest.raises(ClientError) as info:
            s3_client.get_object(Bucket=s3_bucket, Key="m.bin", IfMatch=wrong, **extra)
        assert _status(info.value) == 412
        assert _error_code(info.value) == "PreconditionFailed"


def test_etag_changes_on_overwrite(s3_client: Any, s3_bucket: str) -> None:
    first = s3_client.put_object(Bucket=s3_bucket, Key="e.bin", Body=PAYLOAD)["ETag"]
    assert s3_client.head_object(Bucket=s3_bucket, Key="e.bin")["ETag"] == first
    second = s3_client.put_object(Bucket=s3_bucket, Key="e.bin", Body=PAYLOAD[::-1])["ETag"]
    assert second != first
    head = s3_client.head_object(Bucket=s3_bucket, Key="e.bin")
    assert head["ETag"] == second
    assert head["ContentLength"] == len(PAYLOAD)
    # the old ETag no longer matches
    with pytest.raises(ClientError) as info:
        s3_client.get_object(Bucket=s3_bucket, Key="e.bin", IfMatch=first)
    assert _status(info.value) == 412


def test_bucket_fixture_is_fresh_and_dns_safe(s3_client: Any, s3_bucket: str) -> None:
    assert 3 <= len(s3_bucket) <= 63 and s3_bucket == s3_bucket.lower()
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_missing_bucket_and_key(s3_client: Any, s3_bucket: str) -> None:
    with pytest.raises(ClientError) as info:
        s3_client.get_object(Bucket=s3_bucket, Key="nope")
    assert _error_code(info.value) in {"NoSuchKey", "404"}
    with pytest.raises(ClientError) as info:
        s3_client.put_object(Bucket=s3_bucket + "-missing", Key="k", Body=b"x")
    assert _error_code(info.value) == "NoSuchBucket"


def test_s3_marker_applied(request: pytest.FixtureRequest, s3_endpoint: S3Endpoint) -> None:
    assert request.node.get_closest_marker("s3") is not None
    assert request.node.callspec.id == s3_endpoint.name
