"""Request bodies for tests: the bytes of `.npy` files (any dtype, optionally pickled, for hostile inputs)."""

from __future__ import annotations

import io

import numpy as np


def npy_bytes(x: np.ndarray, allow_pickle: bool = False) -> bytes:
    """The `.npy` file of `x` as it is, dtype included (sdb.client.encode_npy gives float32 base64)."""
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=allow_pickle)
    return buf.getvalue()
