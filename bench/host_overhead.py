"""Host time of one eager call: dense nn.Linear, fp16 and INT8 (per-token and static) SparseLinear at M = 1, enqueued
500 at a time without a sync (best of five), then a cProfile of the INT8 layer by Python
function.

On CUDA (the default): at 256 x 256 the kernels are shorter than the host work, so the rate is
the host's; at 11008 x 4096 a call's host time is comparable with its kernel time.
With --python-only (no GPU needed): the layers run on the CPU with backend="simt" and the
emulator's GEMM and quantize entry points replaced by no-ops, so what is timed is the Python
path of a kernel-backend call alone (the part of the CUDA figure that host code decides).

    python bench/host_overhead.py [--python-only]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from sparsegemm import _C
from sparsegemm.nn import SparseLinear


def per_call_us(layer, x, calls: int = 500) -> float:
    for _ in range(100):
        layer(x)
    best = float("inf")
    for _ in range(5):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-only", action="store_true",
                        help="CPU, backend='simt' with no-op kernels: the Python path alone")
    args = parser.parse_args()
    if args.python_only:
        for name in ("simt_gemm", "simt_gemm_s8", "simt_quantize_rows", "simt_quantize_rows_static"):
            setattr(_C, name, lambda *_: None)
        device, backend, shapes = torch.device("cpu"), "simt", ((256, 256),)
    else:
        device, backend, shapes = torch.device("cuda"), None, ((256, 256), (11008, 4096))
    torch.manual_seed(0)
    with torch.inference_mode():
        for n, k in shapes:
            lin = torch.nn.Linear(k, n, bias=False).to(device).half()
            layers = {"fp16": SparseLinear.from_dense(lin, backend=backend),
                      "int8": SparseLinear.from_dense(lin, quantize="int8", backend=backend),
                      "int8 static": SparseLinear.from_dense(lin, quantize="int8", backend=backend)}
            layers["int8 static"].set_input_scale(0.05)  # a calibrated scale (quant.Int8Calibrator)
            if not args.python_only:  # on the CPU the dense layer would time a real GEMM
                layers = {"dense": lin, **layers}
            x = torch.randn(1, k, device=device, dtype=torch.half)
            for name, layer in layers.items():
                print(f"{n}x{k} {name}: {per_call_us(layer, x):.1f} us/call host", flush=True)
        layer = layers["int8"] if args.python_only else SparseLinear.from_dense(
            torch.nn.Linear(256, 256, bias=False).to(device).half(), quantize="int8")
        x = torch.randn(1, 256, device=device, dtype=torch.half)
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
