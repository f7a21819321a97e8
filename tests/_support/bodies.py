"""Request bodies for tests: the bytes of `.npy` files (any dtype, optionally pickled, for hostile inputs)."""

from __future__ import annotations

import io
import struct

import numpy as np


def npy_bytes(x: np.ndarray, allow_pickle: bool = False) -> bytes:
    """The `.npy` file of `x` as it is, dtype included (sdb.client.encode_npy gives float32 base64)."""
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=allow_pickle)
    return buf.getvalue()


def npy_with_header(header: str, data: bytes = b"") -> bytes:
    """A `.npy` file (format 1.0) with a hand-written header dict, e.g. a malformed one."""
    h = header.encode("latin1")
    pad = (64 - (10 + len(h) + 1) % 64) % 64
    h += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


# Headers numpy itself fails on with exceptions other than ValueError (tokenize.TokenError, TypeError),
# and shapes whose integers (or their product) are past Python's 4,300-digit int/str conversion limit.
MALFORMED_NPY_HEADERS = {
    "unclosed": "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 8, 8, }",
    "bool-in-shape": "{'descr': '<f4', 'fortran_order': False, 'shape': (True,1,8,8), }",
    "huge-dimension": "{'descr': '<f4', 'fortran_order': False, 'shape': (1" + "0" * 4400 + ", 1, 8, 8), }",
    "huge-dimension-numpy-parser": "{'shape': (1" + "0" * 4400 + ", 1, 8, 8), 'fortran_order': False, "
    "'descr': '<f4'}",
    "huge-count": "{'descr': '<f4', 'fortran_order': False, 'shape': (" + ("9" * 18 + ", ") * 250 + "1), }",
}
