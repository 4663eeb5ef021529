"""Host time of one eager call (CUDA): dense nn.Linear, fp16 and INT8 SparseLinear at M = 1,
enqueued 500 at a time without a sync (best of five), then a cProfile of the INT8 layer by
Python function. At 256 x 256 the kernels are shorter than the host work, so the rate is the
host's; at 11008 x 4096 a call's host time is comparable with its kernel time.

    python bench/host_overhead.py
"""
import cProfile
import io
import pstats
import time

import torch

from sparsegemm.nn import SparseLinear


def main() -> None:
    torch.manual_seed(0)
    with torch.inference_mode():
        for n, k in ((256, 256), (11008, 4096)):
            lin = torch.nn.Linear(k, n, bias=False).cuda().half()
            layers = {"dense": lin, "fp16": SparseLinear.from_dense(lin),
                      "int8": SparseLinear.from_dense(lin, quantize="int8")}
            x = torch.randn(1, k, device="cuda", dtype=torch.half)
            for name, layer in layers.items():
                for _ in range(100):
                    layer(x)
                torch.cuda.synchronize()
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(500):
                        layer(x)
                    best = min(best, (time.perf_counter() - start) / 500)
                    torch.cuda.synchronize()
                print(f"{n}x{k} {name}: {best * 1e6:.1f} us/call host", flush=True)
        layer = SparseLinear.from_dense(torch.nn.Linear(256, 256, bias=False).cuda().half(), quantize="int8")
        x = torch.randn(1, 256, device="cuda", dtype=torch.half)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(2000):
            layer(x)
        profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
    print(out.getvalue())


if __name__ == "__main__":
    main()
