"""The throughput benchmark still runs: one tiny round of both pipelines on the CPU."""

import importlib.util
import math
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_tiny_round_of_both_pipelines():
    throughput = load_benchmark()
    argv = "--device cpu --ngf 8 --ndf 8 --image-sizes 16 --batch-sizes 8 --steps 2 --rounds 1 --warmup 1 --dataset-size 64"
    rows = throughput.run_benchmark(throughput.parse_args(argv.split()))

    assert [row["pipeline"] for row in rows] == [throughput.PROGRAM, throughput.CLASSIC]
    for row in rows:
        assert (row["image_size"], row["batch_size"]) == (16, 8)
        assert math.isfinite(row["images_per_s"]) and row["images_per_s"] > 0
        assert math.isfinite(row["peak_mib"]) and row["peak_mib"] > 0
    assert rows[1]["vs_classic"] == 1.0

    table = throughput.format_table(rows, markdown=True).splitlines()
    assert table[0].startswith("| image size |")
    assert len(table) == 4  # header, rule, one row per pipeline
    assert "| gan.py |" in table[2] and "| classic (pytorch/examples) |" in table[3]
