"""The benchmark's bookkeeping (not its timings): rows, derived rates, JSON/CSV output."""
import csv
import json

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
    env = bench.environment(torch.device("cpu"))
    bench.write_outputs(env, rows, str(tmp_path / "r.json"), str(tmp_path / "r.csv"), None)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["environment"]["torch"] == torch.__version__ and len(data["rows"]) == 2
    assert len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 2
    assert "| cpu | bfloat16 | tiny | 3 | 64 | 128 | sparsegemm |" in bench.markdown(rows)
