"""Decoding of request inputs: .npy parsing without pickle or trusted sizes, JSON lists, batch validation."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi import HTTPException

from service.decode import decode_b64_npy, json_to_array, parse_npy, validate_batch
from tests._support.bodies import MALFORMED_NPY_HEADERS, npy_bytes, npy_with_header

SHAPE = (1, 8, 8)


def status_and_detail(exc: pytest.ExceptionInfo[HTTPException]) -> tuple[int, str]:
    return exc.value.status_code, str(exc.value.detail)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", "<f2"])
def test_parse_npy_round_trips_float_arrays(order: str, dtype: str) -> None:
    arr = np.asarray(np.random.default_rng(0).normal(size=(3, *SHAPE)), dtype=dtype, order=order)
    out = validate_batch(parse_npy(npy_bytes(arr)), SHAPE, 16)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, arr.astype(np.float32))


def test_parse_npy_refuses_pickled_objects() -> None:
    data = npy_bytes(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(HTTPException) as exc:
        parse_npy(data)
    code, detail = status_and_detail(exc)
    assert code == 422 and "pickle" in detail


@pytest.mark.parametrize(
    "arr", [np.zeros((2, *SHAPE), np.int64), np.zeros((2, *SHAPE), bool), np.zeros(2, "U3")]
)
def test_parse_npy_refuses_non_float_dtypes(arr: np.ndarray) -> None:
    with pytest.raises(HTTPException) as exc:
        parse_npy(npy_bytes(arr))
    code, detail = status_and_detail(exc)
    assert code == 422 and "float32" in detail


def test_parse_npy_refuses_truncated_and_padded_data() -> None:
    data = npy_bytes(np.zeros((2, *SHAPE), np.float32))
    for bad in (data[:-1], data + b"\0"):
        with pytest.raises(HTTPException) as exc:
            parse_npy(bad)
        assert status_and_detail(exc)[0] == 422


def test_parse_npy_does_not_trust_a_huge_header_shape() -> None:
    # A header announcing ~4 TB of data followed by a few bytes must fail fast, allocating nothing.
    data = npy_bytes(np.zeros((1,), np.float32)).replace(b"(1,)", b"(1000000000000,)")
    with pytest.raises(HTTPException) as exc:
        parse_npy(data)
    assert status_and_detail(exc)[0] == 422


@pytest.mark.parametrize(
    "data", [b"", b"not an npy file at all", b"\x93NUMPY\x09\x00garbage", b"\x93NUMPY\x01\x00\xff"]
)
def test_parse_npy_refuses_non_npy_bytes(data: bytes) -> None:
    with pytest.raises(HTTPException) as exc:
        parse_npy(data)
    assert status_and_detail(exc)[0] == 422


@pytest.mark.parametrize("text", ["not base64!", "QUJD=extra", "ü"])
def test_bad_base64_is_422(text: str) -> None:
    with pytest.raises(HTTPException) as exc:
        decode_b64_npy(text)
    assert status_and_detail(exc) == (422, "inputs_b64 is not valid base64")


def test_base64_of_npy_decodes() -> None:
    arr = np.ones((2, *SHAPE), np.float32)
    np.testing.assert_array_equal(decode_b64_npy(base64.b64encode(npy_bytes(arr)).decode()), arr)


@pytest.mark.parametrize(
    "inputs",
    [[[1, 2], [3]], [["a", "b"]], [[True, False]], [[None]], [[{"x": 1}]], [[1, "2"]], [[10**400]]],
)
def test_json_inputs_must_be_rectangular_numbers(inputs: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(HTTPException) as exc:
        json_to_array(inputs, 16)
    assert status_and_detail(exc)[0] == 422


def test_json_batch_over_limit_is_refused_before_conversion() -> None:
    with pytest.raises(HTTPException) as exc:
        json_to_array([[0.0]] * 17, 16)
    code, detail = status_and_detail(exc)
    assert code == 422 and "limit of 16" in detail


def test_validate_batch_accepts_flat_rows() -> None:
    x = validate_batch(np.zeros((2, 64)), SHAPE, 16)
    assert x.shape == (2, *SHAPE) and x.dtype == np.float32


@pytest.mark.parametrize(
    ("arr", "needle"),
    [
        (np.zeros((2, 1, 8, 7)), "shape"),
        (np.zeros((2, 63)), "shape"),
        (np.zeros((8, 8)), "shape"),
        (np.float32(1.0), "scalar"),
        (np.zeros((0, *SHAPE)), "empty"),
        (np.zeros((0,)), "empty"),
        (np.zeros((17, *SHAPE)), "limit"),
        (np.full((1, *SHAPE), np.nan), "NaN"),
        (np.full((1, *SHAPE), -np.inf), "NaN"),
        (np.full((1, *SHAPE), 1e300), "NaN"),  # overflows float32 to inf
    ],
)
def test_validate_batch_names_the_problem(arr: np.ndarray, needle: str) -> None:
    with pytest.raises(HTTPException) as exc:
        validate_batch(np.asarray(arr), SHAPE, 16)
    code, detail = status_and_detail(exc)
    assert code == 422 and needle in detail


def test_npy_format_2_and_unusual_headers_use_numpys_parser() -> None:
    arr = np.arange(2 * 64, dtype=np.float32).reshape(2, *SHAPE)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(2, 0))
    np.testing.assert_array_equal(parse_npy(buf.getvalue()), arr)
    # Same array, header keys in another order (valid .npy, not what np.save writes).
    header = b"{'shape': (2, 1, 8, 8), 'fortran_order': False, 'descr': '<f4'}"
    header += b" " * (64 - 10 - len(header) - 1) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + arr.tobytes()
    np.testing.assert_array_equal(parse_npy(data), arr)


@pytest.mark.parametrize("header", MALFORMED_NPY_HEADERS.values(), ids=MALFORMED_NPY_HEADERS.keys())
def test_a_malformed_npy_header_is_422(header: str) -> None:
    with pytest.raises(HTTPException) as exc:
        parse_npy(npy_with_header(header, b"\0" * 256))
    status, detail = status_and_detail(exc)
    assert status == 422 and ".npy" in detail
