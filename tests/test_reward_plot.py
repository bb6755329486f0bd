"""The dependency-free PNG writer of the examples: a valid PNG of the right size whose pixels show the curve."""

from __future__ import annotations

import struct
import zlib

from trainer_examples.reward_plot import write_line_png


def test_builtin_png_writer(tmp_path) -> None:
    path = tmp_path / "curve.png"
    write_line_png(str(path), [0.0, 0.5, 1.0], width=100, height=60)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (100, 60)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    blue = bytes((31, 119, 180))
    rows = [raw[y * (1 + 3 * width) + 1:(y + 1) * (1 + 3 * width)] for y in range(height)]
    assert blue in rows[height - 20] and blue in rows[20]  # the curve reaches both 0 (bottom) and 1 (top)
