"""Arrow columns to batch values (no server needed)."""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pytest
import torch

from shoal.engine.torch import LoaderSchemaError, arrow_to_torch, collate


def _address(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


def test_numeric_columns_share_the_arrow_buffers() -> None:
    values = pa.array(np.arange(100, dtype=np.float32))
    batch = pa.RecordBatch.from_arrays([values, pa.array(np.arange(100, dtype=np.int16))], names=["x", "i"])
    sliced = batch.slice(10, 20)
    out = arrow_to_torch(sliced)
    assert out["x"].tolist() == list(range(10, 30)) and out["x"].dtype == torch.float32
    assert out["i"].dtype == torch.int16
    assert _address(out["x"]) == values.buffers()[1].address + 10 * 4  # no copy, slice offset kept
    empty = arrow_to_torch(batch.slice(0, 0))
    assert empty["x"].shape == (0,) and empty["x"].dtype == torch.float32


def test_fixed_size_lists_become_2d_and_3d_tensors_without_copy() -> None:
    flat = pa.array(np.arange(24, dtype=np.float64))
    matrix = pa.FixedSizeListArray.from_arrays(flat, 4)
    cube = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(np.arange(36, dtype=np.float64)), 3), 2)
    out = arrow_to_torch(pa.RecordBatch.from_arrays([matrix, cube], names=["m", "c"]).slice(1, 2))
    assert out["m"].shape == (2, 4) and out["m"][0].tolist() == [4, 5, 6, 7]
    assert _address(out["m"]) == flat.buffers()[1].address + 4 * 8
    assert out["c"].shape == (2, 2, 3) and out["c"][1, 1].tolist() == [15, 16, 17]


def test_variable_lists_are_padded_with_lengths() -> None:
    lists = pa.array([[1, 2, 3], [], None, [4]], pa.list_(pa.int32()))
    large = pa.array([[1.5], [2.5, 3.5], [], []], pa.large_list(pa.float32()))
    out = arrow_to_torch(pa.RecordBatch.from_arrays([lists, large], names=["t", "f"]), pad_value=-1)
    assert out["t"].tolist() == [[1, 2, 3], [-1, -1, -1], [-1, -1, -1], [4, -1, -1]]
    assert out["t_lengths"].tolist() == [3, 0, 0, 1] and out["t"].dtype == torch.int32
    assert out["f"].tolist() == [[1.5, -1], [2.5, 3.5], [-1, -1], [-1, -1]]
    sliced = arrow_to_torch(pa.RecordBatch.from_arrays([lists], names=["t"]).slice(3, 1))
    assert sliced["t"].tolist() == [[4]] and sliced["t_lengths"].tolist() == [1]


def test_other_types() -> None:
    when = pa.array([datetime.datetime(2024, 1, 1), datetime.datetime(2024, 1, 2)], pa.timestamp("s"))
    batch = pa.RecordBatch.from_arrays([
        pa.array([True, False]), when, pa.array(["a", "b"]).dictionary_encode(), pa.array([b"x", b"yz"]),
        pa.array(["s", "t"]), pa.array([{"a": 1}, {"a": 2}]), pa.array([1.0, None]),
    ], names=["b", "ts", "d", "bin", "s", "st", "f"])
    out = arrow_to_torch(batch)
    assert out["b"].tolist() == [True, False] and out["b"].dtype == torch.bool
    assert out["ts"].tolist() == [1704067200, 1704153600] and out["ts"].dtype == torch.int64
    assert out["d"] == ["a", "b"] and out["bin"] == [b"x", b"yz"] and out["s"] == ["s", "t"]
    assert out["st"] == [{"a": 1}, {"a": 2}]
    assert out["f"][0] == 1.0 and torch.isnan(out["f"][1])


def test_nulls_that_cannot_be_tensors_are_clear_errors() -> None:
    with pytest.raises(LoaderSchemaError, match="'n' has null values"):
        arrow_to_torch(pa.RecordBatch.from_arrays([pa.array([1, None])], names=["n"]))
    with pytest.raises(LoaderSchemaError, match="null values inside lists"):
        arrow_to_torch(pa.RecordBatch.from_arrays([pa.array([[1, None]])], names=["l"]))
    with pytest.raises(LoaderSchemaError, match="null lists"):
        arrow_to_torch(pa.RecordBatch.from_arrays(
            [pa.array([[1, 2], None], pa.list_(pa.int64(), 2))], names=["fixed"]))


def test_collate_stacks_pads_and_lists() -> None:
    samples = [{"x": torch.tensor(1), "t": torch.tensor([1, 2]), "b": b"a"},
               {"x": torch.tensor(2), "t": torch.tensor([3]), "b": b"b"}]
    out = collate(samples, pad_value=9)
    assert out["x"].tolist() == [1, 2]
    assert out["t"].tolist() == [[1, 2], [3, 9]] and out["t_lengths"].tolist() == [2, 1]
    assert out["b"] == [b"a", b"b"]
    assert collate([]) == {}
