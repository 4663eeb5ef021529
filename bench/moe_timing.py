"""Mixture-of-experts layers, three ways on the same pruned weights: a dense experts module in
transformers 5's layout (its loop: a host synchronisation and three GEMMs per expert),
SparseExperts' per-expert path (one host read of the route counts a layer, two sparse GEMMs per
routed expert) and, on the GPU, its grouped path (two grouped sparse GEMM launches, the routes
grouped on the device). Milliseconds per forward: eager (20 calls after warm-up, each on another
of four routings, so that different experts are read; CUDA events on the GPU) and, for the
grouped path alone (the others synchronise with the host), replayed from a CUDA graph. On the CPU
(--device cpu) the dense loop and SparseExperts, which runs its per-expert path there.

    python bench/moe_timing.py [--quick] [--device cuda|cpu] [--dtype float16|bfloat16]

Shapes: Mixtral-8x7B's experts (8 x 4096 -> 14336, top-2) and Qwen3-30B-A3B's (128 x 2048 -> 768,
top-8); --quick: 1 and 16 tokens, 16-bit only, else also 256 tokens and INT8.
"""
import argparse
import time

import torch
from torch import nn

from sparsegemm import SparseExperts
from sparsegemm.bench import cuda_graphed
from sparsegemm.format import split_gate_up

SHAPES = {"mixtral-8x7b": (8, 4096, 14336, 2), "qwen3-30b-a3b": (128, 2048, 768, 8)}


class DenseExperts(nn.Module):
    """transformers 5's experts layout and loop (MixtralExperts): gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, experts: int, hidden: int, inner: int, dtype: torch.dtype, device: str):
        super().__init__()
        made = {"device": device, "dtype": dtype}  # made in place: Mixtral's are 2.8 GB in 16 bits
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden, **made) / hidden ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner, **made) / inner ** 0.5)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index).tolist()  # one host read, as transformers' expert_hit
        for expert in hit:
            token, slot = torch.where(top_k_index == expert)
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


def eager_ms(fn, calls) -> float:
    for args in calls[:3]:
        fn(*args)
    reps = 20
    if not calls[0][0].is_cuda:
        begin = time.perf_counter()
        for i in range(reps):
            fn(*calls[i % len(calls)])
        return (time.perf_counter() - begin) * 1e3 / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        fn(*calls[i % len(calls)])
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def graph_ms(fn, args) -> float:
    replay = cuda_graphed(lambda: fn(*args))
    replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16"],
                        help="activations and weights (default: float16 on the GPU, bfloat16 on the CPU)")
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "bfloat16"))
    tokens_list = (1, 16) if args.quick else (1, 16, 256)
    modes = (None,) if args.quick else (None, "int8")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, {str(dtype).replace('torch.', '')}; ms per forward (speedup vs dense)")
    for name, (experts, hidden, inner, top_k) in SHAPES.items():
        torch.manual_seed(0)
        dense = DenseExperts(experts, hidden, inner, dtype, device)
        for quantize in modes:
            sparse = SparseExperts.from_dense(dense, quantize=quantize)
            if quantize is None:  # the dense module on the pruned weights
                with torch.no_grad():
                    for e, (gate_up, down) in enumerate(zip(sparse.gate_up, sparse.down)):
                        dense.gate_up_proj[e] = torch.cat(split_gate_up(gate_up.dense_weight()))
                        dense.down_proj[e] = down.dense_weight()
            per_expert = SparseExperts(list(sparse.gate_up), list(sparse.down))
            per_expert._grouped_forward = lambda *a: None
            for tokens in tokens_list:
                gen = torch.Generator(device=device).manual_seed(tokens)
                calls = []
                for _ in range(4):
                    weights, index = torch.rand(tokens, experts, device=device, generator=gen).topk(top_k, dim=-1)
                    calls.append((torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen), index,
                                  (weights / weights.sum(-1, keepdim=True)).to(dtype)))
                label = f"{name} {quantize or str(dtype).replace('torch.', '')} {tokens:>3} tokens"
                ratio = (lambda t: f" ({t_dense / t:.2f}x)") if quantize is None else (lambda t: "")
                with torch.no_grad():
                    t_dense = eager_ms(dense, calls) if quantize is None else float("nan")
                    t_loop = eager_ms(per_expert, calls)
                    if device == "cpu":
                        print(f"{label}: dense {t_dense:.3f} | SparseExperts {t_loop:.3f}{ratio(t_loop)}", flush=True)
                        continue
                    t_grouped = eager_ms(sparse, calls)
                    t_graph = graph_ms(sparse, calls[0])
                    got, want = sparse(*calls[0]), per_expert(*calls[0])
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                print(f"{label}: dense {t_dense:.3f} | per-expert {t_loop:.3f}{ratio(t_loop)} | grouped "
                      f"{t_grouped:.3f}{ratio(t_grouped)} | grouped, graph {t_graph:.3f}{ratio(t_graph)} | "
                      f"grouped vs per-expert rel. diff {err:.1e}", flush=True)
            del sparse, per_expert
        del dense
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
