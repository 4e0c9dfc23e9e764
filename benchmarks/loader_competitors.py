"""The loaders ``bench_loader.py`` compares Shoal's with, each in its own environment.

* **MosaicML Streaming** (``.venv-streaming``): the competitor issue 6 names
  first.  It pins numpy<2.2 and imports torchvision at ``import streaming``;
  PyPI's torchvision does not import beside the CPU build of torch 2.13.0 on
  this machine's disk, so its environment takes torch 2.14.1 + torchvision
  0.29.1, which pip also finds on this disk (a CUDA build, ~5.4 GB, run on the
  CPU here)::

      python3 -m venv .venv-streaming
      .venv-streaming/bin/pip install torch==2.14.1 torchvision==0.29.1
      .venv-streaming/bin/pip install torch==2.14.1 torchvision==0.29.1 mosaicml-streaming pyarrow

  Data converted with ``MDSWriter`` (``tokens: ndarray:int32``, ``label:
  int64``, 64 MB shards, no compression: its defaults), read with
  ``StreamingDataset(remote=s3://..., local=<cache dir>, shuffle=True)`` +
  ``StreamingDataLoader``; its S3 client takes the endpoint from
  ``S3_ENDPOINT_URL``.

* **LitData** (``.venv-loaderbench``)::

      python3 -m venv .venv-loaderbench
      .venv-loaderbench/bin/pip install torch==2.13.0
      .venv-loaderbench/bin/pip install torch==2.13.0 litdata pyarrow boto3 numpy

  ``litdata.optimize`` (64 MB chunks), ``StreamingDataset(shuffle=True)`` +
  ``StreamingDataLoader``.  Two settings keep it off a pathological path (see
  the note in the results): its cache may hold the whole dataset, and chunks
  read by two workers are memory-mapped like the others.

Both get the same collate as Shoal's batches (padded tokens + lengths + label).
A competitor whose environment is missing is skipped, and the results say so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["COMPETITORS", "Competitor", "build_loader", "convert", "pad_collate"]


@dataclass(frozen=True)
class Competitor:
    name: str
    label: str
    python: Path
    module: str  # imported to check the environment; its __version__ is reported
    prefix: str  # where its converted copy lives in the bucket


COMPETITORS = {
    "streaming": Competitor("streaming", "MosaicML Streaming", ROOT / ".venv-streaming" / "bin" / "python",
                            "streaming", "streaming/"),
    "litdata": Competitor("litdata", "LitData", ROOT / ".venv-loaderbench" / "bin" / "python",
                          "litdata", "litdata/"),
}


def pad_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The competitors' batches get the same padding as Shoal's (padded tokens + lengths)."""
    import numpy as np
    import torch

    lengths = np.fromiter((len(s["tokens"]) for s in samples), dtype=np.int64, count=len(samples))
    out = np.zeros((len(samples), int(lengths.max())), dtype=np.int32)
    for row, sample in enumerate(samples):
        out[row, : lengths[row]] = sample["tokens"]
    return {"tokens": torch.from_numpy(out), "tokens_lengths": torch.from_numpy(lengths),
            "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64)}


def _rows(item: tuple[str, int]):
    """The samples of one row group of the benchmark's Parquet, as the competitors store them."""
    import numpy as np
    import pyarrow.parquet as pq

    path, group = item
    table = pq.ParquetFile(path).read_row_group(group, columns=["tokens", "label"])
    tokens = table.column("tokens").combine_chunks()
    offsets = tokens.offsets.to_numpy()
    values = tokens.values.to_numpy()
    labels = table.column("label").to_numpy()
    for row in range(table.num_rows):
        yield {"tokens": np.ascontiguousarray(values[offsets[row]:offsets[row + 1]]), "label": int(labels[row])}


def convert(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Convert the Parquet files into the competitor's own format (run in its environment)."""
    import pyarrow.parquet as pq

    inputs = [(path, g) for path in spec["local_files"] for g in range(pq.ParquetFile(path).metadata.num_row_groups)]
    t0 = time.perf_counter()
    if name == "litdata":
        from litdata import optimize

        optimize(fn=_rows, inputs=inputs, output_dir=spec["output_dir"], chunk_bytes="64MB",
                 num_workers=spec["workers"], mode="overwrite")
    elif name == "streaming":
        from streaming import MDSWriter

        with MDSWriter(out=spec["output_dir"], columns={"tokens": "ndarray:int32", "label": "int64"},
                       size_limit="64mb") as writer:
            for item in inputs:
                for sample in _rows(item):
                    writer.write(sample)
    else:
        raise ValueError(name)
    return {"convert_s": time.perf_counter() - t0}


def build_loader(name: str, spec: dict[str, Any]) -> tuple[Any, Callable[[int], None], float]:
    """``(loader, set_epoch, import seconds)`` for one competitor, configured from ``spec``."""
    t0 = time.perf_counter()
    if name == "litdata":
        return _litdata(spec, t0)
    if name == "streaming":
        return _streaming(spec, t0)
    raise ValueError(name)


def _streaming(spec: dict[str, Any], t0: float) -> tuple[Any, Callable[[int], None], float]:
    # Its S3 downloader reads the endpoint and credentials from the environment.
    os.environ.update({"S3_ENDPOINT_URL": spec["endpoint"], "AWS_ACCESS_KEY_ID": spec["access_key"],
                       "AWS_SECRET_ACCESS_KEY": spec["secret_key"], "AWS_DEFAULT_REGION": "us-east-1"})
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    import_s = time.perf_counter() - t0
    clean_stale_shared_memory()  # a killed earlier run must not block this one
    ds = StreamingDataset(remote=spec["url"], local=spec["cache_dir"], shuffle=True, shuffle_seed=spec["seed"],
                          batch_size=spec["batch_size"])
    loader = StreamingDataLoader(ds, batch_size=spec["batch_size"], num_workers=spec["workers"],
                                 collate_fn=pad_collate)

    def set_epoch(epoch: int) -> None:
        pass  # StreamingDataset counts epochs itself: every new iteration is the next one

    return loader, set_epoch, import_s


def _litdata(spec: dict[str, Any], t0: float) -> tuple[Any, Callable[[int], None], float]:
    from litdata import StreamingDataLoader, StreamingDataset
    from litdata.streaming import downloader, reader

    import_s = time.perf_counter() - t0
    # LitData GETs chunks with obstore (required by its prefetch thread), which refuses
    # plain HTTP -- our loopback proxy -- unless allowed.
    downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}
    # LitData memory-maps only the chunks no other worker reads; a chunk shared by two
    # DataLoader workers is read from its file whole for every item or decode window
    # (~100 samples/s here: the "stall" of the first runs).  Its reason, a co-worker
    # deleting a shared chunk while it is mapped, cannot happen when the cache holds the
    # whole dataset (max_cache_size below), so every chunk is mapped.
    allow = reader.BinaryReader.enable_mmap_for_chunks

    def enable_mmap_for_all_chunks(self: Any, chunk_indexes: set[int]) -> None:
        config = getattr(self, "_config", None)
        chunks = getattr(config, "_chunks", None)
        allow(self, set(range(len(chunks))) if chunks else chunk_indexes)

    reader.BinaryReader.enable_mmap_for_chunks = enable_mmap_for_all_chunks
    options = {"endpoint_url": spec["endpoint"], "aws_access_key_id": spec["access_key"],
               "aws_secret_access_key": spec["secret_key"], "region_name": "us-east-1"}
    ds = StreamingDataset(spec["url"], cache_dir=spec["cache_dir"], shuffle=True, seed=spec["seed"],
                          storage_options=options, max_cache_size="50GB")
    loader = StreamingDataLoader(ds, batch_size=spec["batch_size"], num_workers=spec["workers"],
                                 collate_fn=pad_collate)

    def set_epoch(epoch: int) -> None:
        pass  # StreamingDataLoader advances the epoch on every iteration itself

    return loader, set_epoch, import_s
