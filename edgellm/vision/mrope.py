"""Qwen2-VL's multimodal RoPE positions for one prompt.

Text tokens count up one by one, t = h = w. An image's tokens (a grid of gh x gw merged patches,
gh = h / merge) start where the text left off: t = start, h = start + row, w = start + column; the
text after it resumes at start + max(gh, gw). The prompt's last position is then below its length,
and every later (decoded) token sits at its cache position + delta, delta = max position + 1 - length.
"""

from __future__ import annotations

import torch


def mrope_positions(length: int, spans: list[tuple[int, tuple[int, int, int]]], merge: int) -> tuple[torch.Tensor, int]:
    """spans: (first token index, patch grid (t, h, w)) of each image, in prompt order, each covering
    t * h * w / merge^2 tokens. Returns (positions [length, 3] int32, delta)."""
    positions = torch.empty(length, 3, dtype=torch.int64)
    cursor = 0   # next token index
    pos = 0      # next text position
    for first, (t, h, w) in sorted(spans):
        text = first - cursor
        positions[cursor:first] = (pos + torch.arange(text))[:, None]
        pos += text
        gh, gw = h // merge, w // merge
        tt = torch.arange(t).view(t, 1, 1).expand(t, gh, gw).reshape(-1)
        hh = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw).reshape(-1)
        ww = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw).reshape(-1)
        count = t * gh * gw
        positions[first:first + count] = torch.stack([tt, hh, ww], dim=-1) + pos
        pos += max(gh, gw)
        cursor = first + count
    positions[cursor:] = (pos + torch.arange(length - cursor))[:, None]
    return positions.to(torch.int32), int(positions.max()) + 1 - length if length else 0
