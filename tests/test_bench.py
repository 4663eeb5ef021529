"""The benchmark's bookkeeping (not its timings): rows, derived rates, JSON/CSV output."""
import csv
import json

import pytest
import torch

from sparsegemm import bench


def test_bench_rows_and_outputs(tmp_path):
    timer = bench.Timer(torch.device("cpu"), warmup=1, repeats=2)
    rows = bench.bench_shape(torch.device("cpu"), torch.bfloat16, "tiny", 3, 64, 128, timer)
    assert [r.method for r in rows] == ["dense", "sparsegemm"]
    for r in rows:
        assert r.ms > 0
        assert abs(r.tflops - 2 * 3 * 64 * 128 / r.ms / 1e9) < 1e-12
    assert rows[0].speedup_vs_dense == 1.0
    assert rows[0].pct_peak_bw != rows[0].pct_peak_bw  # no GPU peak on the CPU: NaN
    env = dict(bench.environment(torch.device("cpu")), peak=(float("nan"), float("nan")))  # a GPU not in GPU_PEAKS
    bench.write_outputs(env, rows, str(tmp_path / "r.json"), str(tmp_path / "r.csv"), None)
    text = (tmp_path / "r.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))  # strict: no NaN
    assert data["environment"]["torch"] == torch.__version__ and len(data["rows"]) == 2
    assert data["rows"][0]["pct_peak_bw"] is None and data["environment"]["peak"] == [None, None]
    assert len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 2
    assert "| cpu | bfloat16 | tiny | 3 | 64 | 128 | sparsegemm |" in bench.markdown(rows)


def test_unavailable_baseline_becomes_a_note_row():
    timer = bench.Timer(torch.device("cpu"), warmup=0, repeats=1)
    rows = bench._Rows(torch.device("cpu"), "bfloat16", "t", 2, 8, 8, timer)
    rows.add("dense", lambda: None, 10)

    def refuses():
        raise RuntimeError("not on this device")

    rows.add("torch-2:4 cuSPARSELt", refuses, 10, baseline=True)
    out = rows.finish()
    assert out[1].note == "RuntimeError: not on this device" and out[1].ms != out[1].ms
    assert "skipped: RuntimeError: not on this device" in bench.markdown(out)
    with pytest.raises(RuntimeError):
        rows.add("sparsegemm", refuses, 10)  # our own method failing is an error, not a note


def test_shapes_and_ms_narrow_the_run_to_those_gemms(monkeypatch):
    # `bench --shapes square-4096 --m 1` went on to the compress, MLP, encoder and conv rows, at
    # M = 16, 197 and 25088, for minutes.
    monkeypatch.setattr(bench, "select_shapes", lambda names: {name: (64, 128) for name in names})
    for narrowing in ({"shapes_filter": ["tiny"]}, {"ms_override": [3]}):
        _, rows = bench.run("cpu", ("bfloat16",), quick=True, progress=False, **narrowing)
        shapes, ms = {row.shape for row in rows}, {row.M for row in rows}
        assert {row.method for row in rows} == {"dense", "sparsegemm"}
        assert shapes == ({"tiny"} if "shapes_filter" in narrowing else {"square-4096"})
        assert ms == ({3} if "ms_override" in narrowing else {1, 16, 256})


def test_repeated_dtypes_and_ms_are_measured_once(monkeypatch):
    monkeypatch.setattr(bench, "select_shapes", lambda names: {name: (64, 128) for name in names})
    _, rows = bench.run("cpu", ("bfloat16", "bfloat16"), progress=False, shapes_filter=["tiny", "tiny"],
                        ms_override=[3, 1, 3])
    assert [(row.M, row.method) for row in rows] == [(3, "dense"), (3, "sparsegemm"), (1, "dense"), (1, "sparsegemm")]


def test_mlp_block_rows():
    timer = bench.Timer(torch.device("cpu"), warmup=0, repeats=1)
    rows = bench.bench_mlp(torch.device("cpu"), "bfloat16", (1,), timer)
    assert [r.method for r in rows] == ["dense nn.Linear", "SparseLinear", "SparseLinear, gate/up fused (SwiGLU)"]
    assert rows[0].N == 3 * 11008
    assert rows[2].rel_error < 1e-2  # the fused block computes what the unfused one does
    assert rows[2].method.startswith("SparseLinear, gate/up fused")


def test_encoder_layer_rows_time_a_converted_attention():
    timer = bench.Timer(torch.device("cpu"), warmup=0, repeats=1)
    rows = bench.bench_encoder(torch.device("cpu"), "bfloat16", ((2, 3),), timer)
    assert [r.method for r in rows] == ["dense nn.TransformerEncoderLayer",
                                        "sparsified (SparseMultiheadAttention, SparseLinear)"]
    assert (rows[0].M, rows[0].N, rows[0].K) == (6, 4 * 768 + 2 * 3072, 768)
    assert rows[1].gbps * rows[1].ms < 0.6 * rows[0].gbps * rows[0].ms  # GB/s x ms: the weight bytes it reads


def test_every_timed_call_follows_a_cache_flush(monkeypatch):
    events = []
    monkeypatch.setattr(bench.CacheFlush, "__call__", lambda self: events.append("flush"))
    timer = bench.Timer(torch.device("cpu"), warmup=2, repeats=3)
    assert timer(lambda: events.append("call")) >= 0
    assert events == ["call", "call"] + ["flush", "call"] * 3  # warm-up unflushed, then each timed call
    # The buffer outsizes the last-level cache twice over (a 2:4 weight that fits the cache where
    # its dense original does not would otherwise be timed from it).
    llc = bench._cpu_last_level_cache_bytes()
    assert llc > 0 and timer.flush.buffer.numel() >= max(2 * llc, 64 << 20)


def test_host_overhead_python_only_runs(tmp_path):
    # bench/host_overhead.py --python-only times the kernel path's Python with no-op kernels (no
    # GPU needed): it must run through and report both layers.
    import os
    import subprocess
    import sys

    import sparsegemm

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "host_overhead.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(sparsegemm.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, script, "--python-only"], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout
    for name in ("fp16", "int8"):
        assert f"256x256 {name}: " in out and "us/call host" in out
    assert "_eager_forward" in out  # the profile shows the plan path ran


@pytest.mark.parametrize("script", ["decode_sweep.py", "mid_m_sweep.py", "large_m_timing.py", "moe_timing.py",
                                    "profile_kernels.py"])
def test_gpu_suite_scripts_import_and_parse_their_arguments_anywhere(tmp_path, script):
    # The GPU suite's timing scripts run only on a lent GPU machine: a broken import (e.g. of a
    # helper from a sibling script) or argument parser must fail here, not cost a device lease.
    import os
    import subprocess
    import sys

    import sparsegemm

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(sparsegemm.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ")


def test_conv_rows_compare_sparse_conv2d_with_the_dense_convolution():
    timer = bench.Timer(torch.device("cpu"), warmup=0, repeats=1)
    rows = bench.bench_conv(torch.device("cpu"), torch.float32, "resnet50.conv4_3x3", 1, timer)
    assert [r.method for r in rows] == ["dense F.conv2d", "SparseConv2d"]
    assert (rows[1].M, rows[1].N, rows[1].K) == (14 * 14, 256, 256 * 9)
    assert rows[1].rel_error < 1e-5 and rows[1].ms > 0


@pytest.mark.parametrize("argv, message", [
    (["bench", "--quick", "--json", "/nonexistent-folder/b.json"],
     "sparsegemm bench: output '/nonexistent-folder/b.json' cannot be written (folder '/nonexistent-folder' does not "
     "exist)"),
    (["bench", "--quick", "--csv", "{tmp}"], "sparsegemm bench: output '{tmp}' is a directory"),
    (["targets", "--json", "/nonexistent-folder/t.json"],
     "sparsegemm targets: output '/nonexistent-folder/t.json' cannot be written"),
    (["bench", "--shapes", "bogus"], "sparsegemm bench: unknown shape(s) ['bogus']; known: ["),
    (["bench", "--quick", "--json", ""], "sparsegemm bench: output '' is empty"),  # measured, wrote nothing
])
def test_the_cli_refuses_a_run_it_could_not_finish_before_measuring(argv, message, tmp_path, capsys, monkeypatch):
    # A path it could not write ended a whole benchmark run in a traceback; an unknown shape in one.
    from sparsegemm.__main__ import main

    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: pytest.fail("measured before refusing"))
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["bench", "targets"])
def test_the_cli_refuses_cuda_where_there_is_none(command, capsys):
    from sparsegemm.__main__ import main

    assert main([command, "--device", "cuda"]) == 2  # was torch's AssertionError traceback
    assert f"sparsegemm {command}: --device cuda, but this machine has no usable CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("m", ["0", "-1", "abc"])
def test_bench_takes_only_positive_m(m, capsys):
    from sparsegemm.__main__ import main

    with pytest.raises(SystemExit) as exit_info:  # M = 0 printed meaningless rows, -1 a traceback
        main(["bench", "--m", m])
    assert exit_info.value.code == 2 and "--m: must be a positive integer" in capsys.readouterr().err


def test_the_demo_refuses_a_size_it_cannot_allocate(capsys):
    from sparsegemm.__main__ import main

    with pytest.raises(SystemExit) as exit_info:  # was the allocator's traceback
        main(["demo", "--size", "100000"])
    assert exit_info.value.code == 2 and "--size: must be at most 16384, got 100000" in capsys.readouterr().err


def test_the_cli_refuses_a_plot_without_matplotlib(monkeypatch, capsys):
    # Said after the whole run, on stdout, with exit code 0.
    import importlib.util

    from sparsegemm.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: pytest.fail("measured before refusing"))
    assert main(["bench", "--quick", "--plot", "speedup.png"]) == 2
    assert "sparsegemm bench: --plot needs matplotlib, which is not installed" in capsys.readouterr().err


def test_the_cli_writes_over_an_existing_file_it_may_write(tmp_path, monkeypatch, capsys):
    from sparsegemm.__main__ import _refusal

    existing = tmp_path / "out.json"
    existing.write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert _refusal("bench", "cpu", ("out.json", str(existing), "/dev/null", None)) == ""


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", (989.0, 4800.0)), ("NVIDIA H100 80GB HBM3", (989.0, 3350.0)),
    ("NVIDIA H100 PCIe", (756.0, 2000.0)), ("NVIDIA H100 NVL", (835.0, 3900.0)),
    ("NVIDIA GH200 480GB", (989.0, 4000.0)), ("NVIDIA GH200 144G HBM3e", (989.0, 4900.0)),
    ("NVIDIA A100-SXM4-80GB", (312.0, 2039.0)), ("NVIDIA A100 80GB PCIe", (312.0, 1935.0)),
    ("NVIDIA A100-SXM4-40GB", (312.0, 1555.0)),
])
def test_gpu_peaks_match_each_variant_before_its_family(monkeypatch, name, peak):
    # "H100 NVL" took the H100 SXM's 3350 GB/s (16% short: a share of peak read high), a GH200
    # the H200's, an A100 80GB PCIe the 40GB's.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.gpu_peak(torch.device("cuda")) == peak
