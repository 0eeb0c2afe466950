"""Frame-index probes: a frame's index painted into its top rows, read back by a client (latency measurements).

A session opened with the ``probe`` option paints each outgoing frame's index with :func:`paint_index`;
the latency benchmark reads it back from the decoded video with :func:`read_index`, so it knows exactly
which frame it received.
"""

from __future__ import annotations

import numpy as np

PROBE_BITS = 16


def paint_index(image: np.ndarray, index: int) -> np.ndarray:
    """A copy of ``image [S,S,3]`` with ``index`` (16 bits) as black/white blocks in its top quarter.

    Two rows of eight square blocks (S/8 wide), most significant bit first: large enough to survive
    VP8/H.264 compression, so a client can tell exactly which frame it received (see :func:`read_index`).
    """
    out = image.copy()
    s = image.shape[0] // 8
    for bit in range(PROBE_BITS):
        r, c = divmod(bit, 8)
        out[r * s:(r + 1) * s, c * s:(c + 1) * s] = 255 if (index >> (PROBE_BITS - 1 - bit)) & 1 else 0
    return out


def read_index(image: np.ndarray) -> int:
    """Read back the index painted by :func:`paint_index` (threshold at mid grey, centre of each block)."""
    s = image.shape[0] // 8
    value = 0
    for bit in range(PROBE_BITS):
        r, c = divmod(bit, 8)
        block = image[r * s + s // 4:(r + 1) * s - s // 4, c * s + s // 4:(c + 1) * s - s // 4]
        value = (value << 1) | int(block.mean() > 127)
    return value
