"""The two ceilings of this GPU: device-to-device copy bandwidth and bf16 matmul rate.

    python -m benchmarks.roofline [--out DIR]
"""

import argparse
import functools

import torch

from .common import cuda_time_ms, print_table, write_result


def measure() -> dict:
    n = 2 * 1024 ** 3 // 2                                   # 2 GiB of bf16 per buffer
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(functools.partial(dst.copy_, src), warmup=3, iters=10)
    bandwidth = 2 * src.numel() * src.element_size() / (ms / 1e3) / 1e12     # read + write, TB/s
    del src, dst
    k = 8192
    a = torch.randn(k, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, k, device="cuda", dtype=torch.bfloat16)
    ms_mm = cuda_time_ms(lambda: a @ b, warmup=3, iters=10)
    tflops = 2 * k ** 3 / (ms_mm / 1e3) / 1e12
    return {"copy_bandwidth_tb_s": bandwidth, "bf16_matmul_tflops": tflops, "copy_ms": ms, "matmul_ms": ms_mm}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    row = measure()
    print_table([row], list(row))
    print(write_result("roofline", {"copy_bytes": 2 * 2 * 1024 ** 3, "matmul": "8192^3 bf16"}, [row], args.out))


if __name__ == "__main__":
    main()
