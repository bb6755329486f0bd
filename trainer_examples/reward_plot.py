"""A reward-curve PNG. Uses matplotlib when it is installed (the project's dev extra has it); otherwise a
small pure-Python writer (zlib + the PNG chunk format) draws the curve on a plain canvas, so the examples
need no plotting dependency."""

from __future__ import annotations

import struct
import zlib
from typing import Sequence


def write_reward_png(path: str, rewards: Sequence[float], title: str = "mean reward per step") -> str:
    """Write the curve; answers which writer was used ("matplotlib" or "builtin")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_line_png(path, rewards, lo=min(0.0, *rewards), hi=max(1.0, *rewards))
        return "builtin"
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(range(1, len(rewards) + 1), rewards, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    if min(rewards, default=0) >= 0 and max(rewards, default=1) <= 1:
        ax.set_ylim(-0.02, 1.02)  # a success rate: the full range, so progress reads at a glance
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def write_line_png(path: str, values: Sequence[float], width: int = 640, height: int = 360,
                   lo: float = 0.0, hi: float = 1.0) -> None:
    """Values in [lo, hi] as a blue polyline in a gray frame with quarter grid lines, white background."""
    px = [[(255, 255, 255)] * width for _ in range(height)]
    m = 20  # margin

    def put(x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            px[y][x] = c

    for q in range(5):  # frame and grid
        y = m + round(q * (height - 2 * m) / 4)
        for x in range(m, width - m):
            put(x, y, (120, 120, 120) if q in (0, 4) else (225, 225, 225))
    for y in range(m, height - m + 1):
        put(m, y, (120, 120, 120))
        put(width - m - 1, y, (120, 120, 120))
    pts = []
    for i, v in enumerate(values):
        x = m + (round(i * (width - 2 * m - 1) / max(len(values) - 1, 1)))
        y = height - m - round((min(max(v, lo), hi) - lo) / (hi - lo) * (height - 2 * m))
        pts.append((x, y))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] or pts):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            x, y = x0 + (x1 - x0) * s // steps, y0 + (y1 - y0) * s // steps
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    put(x + dx, y + dy, (31, 119, 180))
    raw = b"".join(b"\x00" + bytes(c for p in row for c in p) for row in px)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
