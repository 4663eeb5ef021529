"""Llama-7B MLP block at 1 and 16 tokens (bench.bench_mlp: eager and CUDA-graph rows), fp16 and INT8."""
import torch

from sparsegemm import bench

dev = torch.device("cuda")
timer = bench.Timer(dev, warmup=10, repeats=50)
for dt in ("float16", "int8"):
    for r in bench.bench_mlp(dev, dt, (1, 16), timer):
        print(f"{dt:8s} {r.shape:28s} M={r.M:3d} {r.method:40s} {r.ms * 1e3:7.1f} us {r.speedup_vs_dense:5.2f}x",
              flush=True)
