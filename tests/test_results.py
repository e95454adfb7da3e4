"""The benchmark records: emulation reports n/a, JSON carries provenance, README blocks render."""

import json

from common import runtime
from common.results import BenchReport, gpu_slug, markdown_table
from common.timing import Timing, bench, gbps, host_us, tflops


def test_bench_under_emulation_runs_once_and_reports_none():
    if runtime.is_gpu():
        return
    calls = []
    assert bench(lambda: calls.append(1)) is None
    assert calls == [1]


def test_host_us_counts_host_time_per_call():
    import time
    calls = []

    def slow():                       # 300 us of host work per call, nothing on the GPU
        calls.append(1)
        end = time.perf_counter() + 300e-6
        while time.perf_counter() < end:
            pass
    if runtime.is_emulated():
        assert host_us(slow) is None and calls == [1]
    else:
        t = host_us(slow, calls=10, warmup=2)
        assert len(calls) == 12 and 300 <= t < 3000


def test_throughput_units():
    assert gbps(3e9, 1000.0) == 3.0 and tflops(2e12, 1000.0) == 2.0
    assert gbps(1, None) is None


def test_report_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path))
    r = BenchReport("02_vector_add", "demo", "GB/s", ceilings={"copy_gbps": 3000.0})
    t = Timing(1.25, 1.2, 1.3, 1.1, 50)
    r.add({"n": 1024}, "ours", t, value=2900.0)
    r.add({"n": 1024}, "torch", Timing(1.3, 1.2, 1.4, 1.1, 50), value=2800.0, peer=True)
    path = r.save()
    assert path.parent == tmp_path and path.name == f"demo-{gpu_slug()}.json"
    data = json.loads(path.read_text())
    assert data["environment"]["packages"]["torch"]
    assert data["rows"][0]["ms"] == 1.25 and data["rows"][1]["peer"] is True
    md = markdown_table(data)
    assert "| 1024 | 2,900.0 | 2,800.0 |" in md and "torch (peer) [GB/s]" in md


def test_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
