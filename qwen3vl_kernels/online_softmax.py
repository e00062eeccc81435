"""One step of the streaming (online) softmax shared by the attention kernels.

Folds a tile of keys/values into the running max `m`, normaliser `l` and output accumulator
`acc` of a block of query rows; masked-out keys (`live` false: (1, keys) for every row alike, or
(rows, keys)) contribute nothing.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(q, k, v, live, scale, m, l, acc):
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(live, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc
