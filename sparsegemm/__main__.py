"""Command line: ``python -m sparsegemm {info,demo,bench,targets,report}``."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import torch


def cmd_info(_args) -> int:
    import sparsegemm

    print(json.dumps(sparsegemm.info(), indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    """Prune, compress and run a layer on whatever device is here; print sizes, error and speed."""
    import sparsegemm
    from sparsegemm import oracle
    from sparsegemm.bench import Timer

    device = torch.device("cuda" if torch.cuda.is_available() and sparsegemm.info()["cuda_built"] else "cpu")
    timer = Timer(device, warmup=3, repeats=args.repeats)  # median, each call after a cache flush
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    n = k = args.size
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    print(f"sparsegemm {sparsegemm.__version__} demo on {device} ({sparsegemm.info()['cpu_isa'] if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
          f"{str(dtype).replace('torch.', '')}, weight {n} x {k}, {torch.get_num_threads()} CPU threads")
    sw = sparsegemm.compress(w.to(device), prune=True)
    kept = float(sparsegemm.prune_2to4(w).abs().float().sum() / w.abs().float().sum())
    print(f"  weight: dense {sw.dense_nbytes / 2**20:.1f} MiB -> compressed {sw.nbytes / 2**20:.1f} MiB "
          f"({sw.nbytes / sw.dense_nbytes:.1%}); magnitude kept by the 2:4 mask {kept:.1%}")
    w_pruned = sparsegemm.decompress(sw).cpu()
    for m in args.tokens:
        x = torch.randn(m, k, generator=gen).to(dtype)
        xd = x.to(device)
        y = sparsegemm.linear(xd, sw, bias.to(device))
        ref = oracle.linear(x, w_pruned, bias)
        err = float(abs(y.cpu().double().numpy() - ref).max())
        base = oracle.dense_baseline_error(x, w_pruned, bias)
        oracle.assert_close_to_oracle(y, x, w_pruned, bias)
        dense_w = w_pruned.to(device)
        t_sparse = timer(lambda: sparsegemm.linear(xd, sw, bias.to(device)))
        t_dense = timer(lambda: torch.nn.functional.linear(xd, dense_w, bias.to(device)))
        print(f"  M = {m:4d}: max |error| vs float64 oracle {err:.3g} (dense {str(dtype).replace('torch.', '')} "
              f"baseline {base:.3g}); sparse {t_sparse:.3f} ms, dense {t_dense:.3f} ms, "
              f"speedup {t_dense / t_sparse:.2f}x")
    return 0


def _print_environment(env: dict) -> None:
    """The line that says what a bench or targets run measured on."""
    print(" ".join(f"{k}={v}" for k, v in env.items()))


def _refusal(command: str, device: str, outputs: tuple) -> str:
    """Why a bench or targets run cannot start (a CUDA device this machine lacks, an output it could
    not write once it has measured), or "": said before minutes of measuring, not after."""
    import os

    import sparsegemm

    cuda_built = sparsegemm.info()["cuda_built"] if device == "cuda" else False
    if device == "cuda" and not (torch.cuda.is_available() and cuda_built):
        return (f"sparsegemm {command}: --device cuda, but this machine has no usable CUDA device (torch sees "
                f"{torch.cuda.device_count()} GPUs; sparsegemm built with CUDA: {cuda_built})")
    for path in (path for path in outputs if path is not None):
        folder = os.path.dirname(os.path.abspath(path))
        if not path:  # the run would measure and then write nothing
            why = "is empty"
        elif os.path.isdir(path):
            why = "is a directory"
        elif os.path.exists(path):  # overwritten in place (a file, /dev/stdout): its own permission counts
            why = "" if os.access(path, os.W_OK) else "is not writable"
        elif not os.path.isdir(folder):
            why = f"cannot be written (folder {folder!r} does not exist)"
        else:
            why = "" if os.access(folder, os.W_OK) else f"cannot be written (folder {folder!r} is not writable)"
        if why:
            return f"sparsegemm {command}: output {path!r} {why}"
    return ""


def cmd_bench(args) -> int:
    """GEMM microbenchmarks vs dense (and torch's 2:4 path on CUDA); markdown, JSON, CSV, plot."""
    from sparsegemm import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = args.dtype or (["float16", "bfloat16"] if device == "cuda" else ["bfloat16"])
    if device == "cuda" and "float32" in dtypes:  # an argument error, whatever this machine has
        refusal = ("sparsegemm bench: float32 runs on the CPU backend only (the tensor-core kernels take "
                   "float16, bfloat16 and int8)")
    else:
        refusal = _refusal("bench", device, (args.json, args.csv, args.plot))
    if not refusal and args.plot and importlib.util.find_spec("matplotlib") is None:
        refusal = "sparsegemm bench: --plot needs matplotlib, which is not installed (pip install matplotlib)"
    if not refusal and args.shapes:
        try:
            bench.select_shapes(args.shapes)
        except ValueError as exc:
            refusal = f"sparsegemm {exc}"
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    env, rows = bench.run(device, dtypes, quick=args.quick, progress=not args.no_progress, shapes_filter=args.shapes,
                          ms_override=args.m)
    _print_environment(env)
    print(bench.markdown(rows))
    bench.write_outputs(env, rows, args.json, args.csv, args.plot)
    return 0


def cmd_targets(args) -> int:
    """The speed targets of the issues, measured and judged (sparsegemm.targets); markdown, JSON."""
    from sparsegemm import targets

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    refusal = _refusal("targets", device, (args.json,))
    if refusal:
        print(refusal, file=sys.stderr)
        return 2

    # Row by row as judged, the JSON written at the start and rewritten with each verdict: a run its
    # time limit cuts short (the GPU suite's step) keeps what it measured.
    env, judged = {}, []

    def write() -> None:
        if args.json:
            targets.write_json(env, judged, args.json)

    def start(environment: dict) -> None:
        env.update(environment)
        _print_environment(environment)
        print(targets.markdown_header(), flush=True)
        write()

    def on_verdict(verdict) -> None:
        judged.append(verdict)
        print(targets.markdown_row(verdict), flush=True)
        write()

    targets.run(device, quick=args.quick, progress=not args.no_progress, on_environment=start, on_verdict=on_verdict)
    print("\n" + targets.markdown_summary(judged))
    return 0


def cmd_report(args) -> int:
    """Per-layer sizes of a checkpoint written by sparsegemm.save."""
    from sparsegemm.io import describe

    try:
        print(describe(args.path))
    except (OSError, ValueError) as exc:  # missing, unreadable, not a sparsegemm checkpoint: one line
        print(exc, file=sys.stderr)
        return 2
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would name this function ("invalid _positive value")
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# The demo's largest N = K: its fp32 weight draw is then 1 GiB (a larger one failed with a traceback
# from the allocator, or an overflow).
_DEMO_MAX_SIZE = 16384


def _demo_size(text: str) -> int:
    value = _positive(text)
    if value > _DEMO_MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {_DEMO_MAX_SIZE}, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsegemm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what was built and what this machine offers").set_defaults(fn=cmd_info)
    demo = sub.add_parser("demo", help="prune, compress, run a layer: sizes, error vs oracle, speed vs dense")
    demo.add_argument("--size", type=_demo_size, default=4096,
                      help=f"N = K of the demo weight (default 4096, at most {_DEMO_MAX_SIZE})")
    demo.add_argument("--tokens", type=_positive, nargs="+", default=[1, 16, 512],
                      help="M values to run (default 1 16 512)")
    demo.add_argument("--repeats", type=_positive, default=20, help="timed calls per measurement (default 20)")
    demo.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bench", help="GEMM microbenchmarks vs dense and torch's 2:4 path")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    b.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32", "int8"],
                   help="default: fp16+bf16 on cuda, bf16 on cpu; float32: cpu only; int8: INT8 2:4 rows "
                        "(sparsegemm.bench)")
    b.add_argument("--quick", action="store_true", help="one shape, a few M: about a minute")
    b.add_argument("--shapes", nargs="+", help="only the GEMMs of these shapes (e.g. llama2-7b.gate_up "
                                               "square-8192); no compress, MLP, encoder or conv rows")
    b.add_argument("--m", type=_positive, nargs="+", help="only the GEMMs at these M values; no compress, MLP, "
                                                          "encoder or conv rows")
    b.add_argument("--json", help="write the result rows (with the environment) as JSON here")
    b.add_argument("--csv", help="write the result rows as CSV here")
    b.add_argument("--plot", help="write a PNG of speedup vs M here (needs matplotlib)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(fn=cmd_bench)
    t = sub.add_parser("targets", help="the speed targets (decode bandwidth, 8192^3, compress, MLP block): "
                                       "measured and judged met / missed")
    t.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    t.add_argument("--quick", action="store_true", help="a few cases of each target")
    t.add_argument("--json", help="write the verdicts (with their rows and the environment) as JSON here")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_targets)
    r = sub.add_parser("report", help="per-layer sizes of a checkpoint saved with sparsegemm.save")
    r.add_argument("path", help="a .safetensors file written by sparsegemm.save")
    r.set_defaults(fn=cmd_report)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
