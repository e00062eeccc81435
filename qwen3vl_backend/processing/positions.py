"""3-D (mRoPE) position ids for a prompt of text, image and video tokens.

Text tokens advance all three axes together. A vision group (the pad tokens of one image, or
of one video frame: the `<t seconds>` text between frames splits a video into one group per
temporal patch) takes t = start, h = start + row, w = start + col over the merged grid, and the
next token starts at start + max(rows, cols). While decoding, every axis is the token index plus
`delta` = (largest prompt position + 1) - prompt length.
"""

from __future__ import annotations

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def mrope_positions(token_types: list[int], grids: dict[int, list[tuple[int, int, int]]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """token_types (L,) of TEXT/IMAGE/VIDEO; grids[IMAGE|VIDEO] in prompt order -> ((3, L), delta)."""
    frames = {IMAGE: iter(grids.get(IMAGE, [])),
              VIDEO: iter([(1, h, w) for t, h, w in grids.get(VIDEO, []) for _ in range(t)])}
    chunks, pos, i, n = [], 0, 0, len(token_types)
    while i < n:
        kind, j = token_types[i], i
        while j < n and token_types[j] == kind:
            j += 1
        if kind == TEXT:
            chunks.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
        else:
            try:
                _, h, w = next(frames[kind])
            except StopIteration:
                raise ValueError("more vision token groups than media grids") from None
            gh, gw = h // merge, w // merge
            if gh * gw != j - i:
                raise ValueError(f"vision group of {j - i} tokens does not match grid {gh}x{gw}")
            rows = torch.arange(gh).view(-1, 1).expand(gh, gw).flatten()
            cols = torch.arange(gw).view(1, -1).expand(gh, gw).flatten()
            chunks.append(torch.stack((torch.zeros_like(rows), rows, cols)) + pos)
            pos += max(gh, gw)
        i = j
    positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
    delta = (int(positions.max()) + 1 - n) if n else 0
    return positions, delta


def decode_positions(start: int, count: int, delta: int) -> torch.Tensor:
    """Positions (3, count) of tokens start..start+count-1 past the prompt."""
    return (torch.arange(start, start + count) + delta).expand(3, -1)
