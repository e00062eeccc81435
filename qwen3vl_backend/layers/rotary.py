"""Rotary embeddings: interleaved multimodal RoPE for the decoder, 2-D axial RoPE for the ViT.

mRoPE positions are `(3, T)`: temporal, height and width ids per token (all three equal for
text). Qwen3-VL interleaves the three axes over the frequency index (t h w t h w ... then the
tail of t), where Qwen2-VL gave each axis one contiguous chunk; `mrope_interleaved` picks.
"""

import torch


def rope_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def mrope_axis_map(half_dim: int, section: tuple[int, int, int], interleaved: bool) -> torch.Tensor:
    """For each of the `half_dim` frequencies, which position axis (0=t, 1=h, 2=w) drives it."""
    axis = torch.zeros(half_dim, dtype=torch.long)
    if interleaved:
        for a in (1, 2):
            axis[a : section[a] * 3 : 3] = a
    else:
        axis[section[0] : section[0] + section[1]] = 1
        axis[section[0] + section[1] : sum(section)] = 2
    return axis


def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, axis_map: torch.Tensor):
    """positions (3, T) -> cos, sin of shape (T, 2 * len(inv_freq)), in float32."""
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]          # (3, T, D/2)
    freqs = freqs.gather(0, axis_map.view(1, 1, -1).expand(1, freqs.shape[1], -1)).squeeze(0)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D); cos/sin (T, D). Computed in float32, returned in x's dtype."""
    xf = x.float()
    out = xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]
    return out.to(x.dtype)


def vision_rope_cos_sin(hw_positions: torch.Tensor, head_dim: int, theta: float):
    """hw_positions (N, 2) row/col ids -> cos, sin (N, head_dim): half the dims for rows, half for cols."""
    inv_freq = rope_inv_freq(head_dim // 2, theta).to(hw_positions.device)
    freqs = hw_positions.float()[:, :, None] * inv_freq                      # (N, 2, D/4)
    freqs = freqs.flatten(1)                                                  # (N, D/2): rows then cols
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
