"""The speed-target report (sparsegemm.targets): which cases it measures and how it judges them
(its timings are the benchmark's; no test asserts a speed)."""
import json

import pytest
import torch

from sparsegemm import bench, targets
from sparsegemm.__main__ import main

TINY = targets.Cases(decode_sides=(64,), decode_ms=(1, 3), decode_ms_int8=(2,), large_side=64, compress_side=64,
                     mlp_dtypes=())


def test_judge():
    nan = float("nan")
    assert targets.judge(80.0, 80.0) == "met" and targets.judge(79.9, 80.0) == "missed"
    assert targets.judge(1.2, nan) == "reported" and targets.judge(nan, 1.5) == "not measured"


def test_every_case_is_measured_and_reported_on_the_cpu(tmp_path):
    streamed = []
    verdicts = targets.measure(torch.device("cpu"), TINY, progress=False, on_verdict=streamed.append)
    assert streamed == verdicts  # each handed on as judged, in order (the CLI prints them so)
    decode = [v for v in verdicts if v.target.startswith("decode")]
    # fp16 and bf16 at M in {1, 3}, INT8 at M = 2.
    assert [v.case for v in decode] == ["float16 1 x 64 x 64", "float16 3 x 64 x 64", "bfloat16 1 x 64 x 64",
                                        "bfloat16 3 x 64 x 64", "int8 2 x 64 x 64"]
    for v in decode:
        dense, sparse = v.rows
        assert (dense.method, sparse.method) == ("dense", "sparsegemm")
        # No DRAM peak is known on the CPU: the figure is the GB/s of the bytes the call reads and writes.
        assert v.unit == "GB/s (no peak known)" and v.verdict == "reported" and v.value == sparse.gbps > 0
        m, n, k = sparse.M, sparse.N, sparse.K
        item = 2  # fp16 / bf16 activations (INT8 ones are bf16 on the CPU)
        weight = n * k // 2 * (1 if v.case.startswith("int8") else item) + n * k // 8
        assert sparse.gbps * sparse.ms * 1e6 == pytest.approx(weight + (m * k + m * n) * item
                                                                 + (4 * n if v.case.startswith("int8") else 0))
    large = [v for v in verdicts if v.target.startswith("64^3")]
    assert [v.case for v in large] == ["float16 64^3", "bfloat16 64^3", "int8 64^3"]
    # 1.5x dense is asked of A100-class GPUs only: elsewhere the ratio is reported.
    assert all(v.verdict == "reported" and v.threshold != v.threshold and v.value > 0 for v in large)
    accuracy = [v for v in verdicts if v.target.startswith("accuracy")]
    assert len(accuracy) == 1 and 0 < accuracy[0].value < 0.05
    assert [v.case for v in verdicts if v.target.startswith("compress")] == ["float16 64^2", "bfloat16 64^2"]
    targets.write_json({"device": "cpu"}, verdicts, str(tmp_path / "t.json"))
    document = json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert len(document["verdicts"]) == len(verdicts) and document["verdicts"][0]["rows"][1]["method"] == "sparsegemm"
    text = targets.markdown(verdicts)
    assert "| 3 CUDA | decode >= 80% of DRAM bandwidth | float16 1 x 64 x 64 |" in text
    assert "- decode >= 80% of DRAM bandwidth: 5 reported" in text


def _row(method, ms, shape="s", pct_bw=float("nan")):
    return bench.Row("cuda", "float16", shape, 1, 8, 8, method, ms, 1.0, 1.0, pct_peak_bw=pct_bw)


def test_a_known_peak_is_judged():
    for pct, verdict in ((85.0, "met"), (52.0, "missed")):
        v = targets._bandwidth_verdict("3 CUDA", "decode", 80.0, "case", _row("sparsegemm", 1.0, pct_bw=pct), "", [])
        assert (v.value, v.unit, v.verdict) == (pct, "% of peak", verdict)


def test_mlp_targets_judge_graph_rows_for_decode_and_eager_rows_for_prefill(monkeypatch):
    def rows(device, dtype, tokens, timer):
        out = []
        for m in tokens:
            for shape, dense_ms in (("llama2-7b.mlp", 3.0), ("llama2-7b.mlp (CUDA graph)", 2.0)):
                if shape.endswith("graph)") and m > 16:
                    continue
                group = [_row("dense nn.Linear", dense_ms, shape), _row("SparseLinear", 1.6, shape),
                         _row("SparseLinear, gate/up fused (SwiGLU)", 1.25, shape)]
                for r in group:
                    r.M, r.speedup_vs_dense = m, dense_ms / r.ms
                out += group
        return out

    monkeypatch.setattr(bench, "bench_mlp", rows)
    cases = targets.Cases(mlp_decode_tokens=(1, 16), mlp_prefill_tokens=4096)
    got = {v.case: (v.value, v.verdict) for v in targets._mlp_verdicts(torch.device("cuda"), "float16", cases, None)}
    # Decode from the graph rows (2.0 ms dense): 1.25x and 1.6x against 1.5x; prefill eager (3.0 ms) against 1.3x.
    assert got["float16 1 tokens, SparseLinear, CUDA graph"] == (1.25, "missed")
    assert got["float16 16 tokens, gate/up fused, CUDA graph"] == (1.6, "met")
    assert got["float16 4096 tokens, SparseLinear, eager"] == (1.875, "met")
    assert len(got) == 6
    int8 = targets._mlp_verdicts(torch.device("cuda"), "int8", cases, None)
    assert {v.verdict for v in int8} == {"reported"}  # INT8's block figures are reported, not judged


def test_command_line_prints_and_writes_the_verdicts(monkeypatch, tmp_path, capsys):
    verdict = targets.Verdict("3 CUDA", "decode >= 80% of DRAM bandwidth", "float16 1 x 8 x 8", 61.5, "% of peak",
                              80.0, "missed", "20.0 us")
    seen = {}

    def run(device, quick, progress, on_environment, on_verdict):
        seen.update(device=device, quick=quick, progress=progress)
        on_environment({"device": "test"})
        on_verdict(verdict)
        return {"device": "test"}, [verdict]

    monkeypatch.setattr(targets, "run", run)
    assert main(["targets", "--quick", "--device", "cpu", "--no-progress", "--json", str(tmp_path / "v.json")]) == 0
    assert seen == {"device": "cpu", "quick": True, "progress": False}
    out = capsys.readouterr().out
    assert out.index("device=test") < out.index("| issue |") < out.index("| float16 1 x 8 x 8 | 61.50 % of peak | "
                                                                          "missed | 20.0 us |") < out.index("- decode")
    assert json.loads((tmp_path / "v.json").read_text())["verdicts"][0]["verdict"] == "missed"


def test_a_failing_case_is_not_measured_and_the_rest_go_on(monkeypatch):
    # One case's error (an out-of-memory, a capture refused) ended the whole run: no later verdict,
    # no JSON. A CUDA error is sticky in its process: the run stops there.
    real = targets.decode_rows

    def decode_rows(device, dtype, m, n, k, timer):
        if (dtype, m) == ("float16", 3):
            raise RuntimeError("out of memory")
        if dtype == "int8":
            raise RuntimeError("CUDA error: an illegal instruction was encountered")
        return real(device, dtype, m, n, k, timer)

    monkeypatch.setattr(targets, "decode_rows", decode_rows)
    verdicts = targets.measure(torch.device("cpu"), TINY, progress=False)
    assert [(v.case, v.verdict) for v in verdicts] == [
        ("float16 1 x 64 x 64", "reported"), ("float16 3 x 64 x 64", "not measured"),
        ("bfloat16 1 x 64 x 64", "reported"), ("bfloat16 3 x 64 x 64", "reported"),
        ("int8 2 x 64 x 64", "not measured"),  # then no case runs: each is reported not run
        ("float16", "not measured"), ("bfloat16", "not measured"), ("int8", "not measured"),
        ("float16", "not measured"), ("bfloat16", "not measured")]
    assert verdicts[1].detail == "RuntimeError: out of memory" and verdicts[1].issue == "3 CUDA"
    # Under the targets they would have been judged against, grouped with the measured ones.
    assert [v.target for v in verdicts[4:]] == [
        "decode >= 80% of DRAM bandwidth", "64^3 >= 1.5x dense (reported off A100-class GPUs)",
        "64^3 >= 1.5x dense (reported off A100-class GPUs)", "64^3 >= 1.5x dense INT8 (reported off A100-class GPUs)",
        "compress >= 70% of DRAM bandwidth", "compress >= 70% of DRAM bandwidth"]
    assert verdicts[5].detail == ("not run: an earlier case's CUDA fault (RuntimeError: CUDA error: an illegal "
                                  "instruction was encountered)")
    assert verdicts[4].issue == "4 INT8" and verdicts[4].value != verdicts[4].value
    # The extension's own launch errors poison the context too; an out-of-memory does not.
    assert targets._sticky_cuda_error("sparsegemm: gemm failed for sg_launch(...): an illegal memory access was "
                                      "encountered")
    assert not targets._sticky_cuda_error("CUDA error: out of memory")


def test_the_command_line_rewrites_the_json_with_each_verdict(monkeypatch, tmp_path):
    # Written once at the end, a run its time limit cut short (the GPU suite's step) left none.
    path = tmp_path / "v.json"
    counts = []

    def run(device, quick, progress, on_environment, on_verdict):
        on_environment({"device": "test"})
        for i in range(3):
            on_verdict(targets.Verdict("3 CUDA", "t", f"case {i}", 1.0, "x", float("nan"), "reported", ""))
            counts.append(len(json.loads(path.read_text())["verdicts"]))
        raise KeyboardInterrupt  # the step's time limit

    monkeypatch.setattr(targets, "run", run)
    with pytest.raises(KeyboardInterrupt):
        main(["targets", "--device", "cpu", "--no-progress", "--json", str(path)])
    assert counts == [1, 2, 3] and json.loads(path.read_text())["environment"] == {"device": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["v.json"]  # written aside and renamed: no partial file left
