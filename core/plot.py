"""A loss-curve PNG with no plotting library: lines rasterised with numpy, a 3×5 pixel font for the labels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# 3×5 glyphs, rows top to bottom, 3 bits a row
GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", "s": "011100010001110", "t": "010111010010011", "p": "111101111100100",
    "l": "100100100100111", "o": "000111101101111", "r": "000111100100100", "a": "000011101101011",
    "i": "010000010010010", "n": "000110101101101", "v": "000101101101010", " ": "000000000000000",
}
COLORS = {"train": (31, 119, 180), "eval": (214, 39, 40)}


def _text(img, x, y, text, color=(0, 0, 0), scale=2):
    for ch in text:
        bits = GLYPHS.get(ch, GLYPHS[" "])
        for r in range(5):
            for c in range(3):
                if bits[r * 3 + c] == "1":
                    img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img, xs, ys, color):
    for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        px = np.linspace(x0, x1, n).round().astype(int)
        py = np.linspace(y0, y1, n).round().astype(int)
        for dy in (0, 1):
            img[np.clip(py + dy, 0, img.shape[0] - 1), px] = color


def _write_png(path: Path, img: np.ndarray) -> None:
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[row].astype(np.uint8).tobytes() for row in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))


def loss_png(path: str | Path, series: dict[str, list[tuple[int, float]]], width=720, height=420) -> None:
    """Plot each named series of (step, loss) points; names found in COLORS get their colour and a legend."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    points = [p for s in series.values() for p in s]
    if not points:
        return _write_png(Path(path), img)
    x_max = max(max(s for s, _ in points), 1)
    y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
    y_hi = y_hi if y_hi > y_lo else y_lo + 1.0
    img[top:bottom + 1, left] = img[bottom, left:right + 1] = (0, 0, 0)
    for frac in (0.0, 0.5, 1.0):
        value = y_lo + frac * (y_hi - y_lo)
        y = int(bottom - frac * (bottom - top))
        img[y, left - 4:left] = (0, 0, 0)
        _text(img, 4, y - 5, f"{value:.2f}")
        step = int(frac * x_max)
        x = int(left + frac * (right - left))
        img[bottom:bottom + 4, x] = (0, 0, 0)
        _text(img, min(x - 6, width - 50), bottom + 8, str(step))
    _text(img, (left + right) // 2 - 16, height - 14, "step")
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS.get(name, (90, 90, 90))
        xs = [left + s / x_max * (right - left) for s, _ in pts]
        ys = [bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top) for _, v in pts]
        if len(pts) == 1:
            xs, ys = xs * 2, ys * 2
        _line(img, xs, ys, color)
        img[top + 6 + 16 * i:top + 14 + 16 * i, right - 90:right - 78] = color
        _text(img, right - 72, top + 5 + 16 * i, name)
    _write_png(Path(path), img)
