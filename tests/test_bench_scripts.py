"""The benchmarks (benchmarks/): their rules (crossover, mixed config, targets, needed density) and their CPU smoke
runs."""

import csv
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest

from sparse_prefill import ModelInfo
from sparse_prefill.config import PATTERN_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: `from common import ...` finds benchmarks/common.py


def load(name: str):
    """A benchmark (benchmarks/<name>.py) or a user tool (scripts/<name>.py) as a module."""
    if name not in sys.modules:
        folder = BENCHMARKS if name.startswith("bench_") else ROOT / "scripts"
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def rows(wins: dict[int, list[bool]]) -> list[dict]:
    """Rows of bench_crossover: per length, one row per input, sparse faster or not."""
    return [
        {"S": S, "input": i, "best_dense_ms": 10.0, "sparse_ms": 9.0 if win else 11.0}
        for S, per_input in wins.items()
        for i, win in enumerate(per_input)
    ]


def test_crossover_is_where_sparse_wins_from_then_on():
    crossover = load("bench_crossover").crossover
    # Wins at 16K by luck, loses at 24K on one input: the crossover is 32K, not 16K.
    table = {8192: [False, False], 16384: [True, True], 24576: [True, False], 32768: [True, True], 65536: [True, True]}
    assert crossover(rows(table), "best_dense_ms") == 32768
    assert crossover(rows({8192: [True], 16384: [True]}), "best_dense_ms") == 8192
    assert crossover(rows({8192: [True], 16384: [False]}), "best_dense_ms") is None


def test_table_lines_paste_into_the_tables():
    bench = load("bench_crossover")
    results = {
        128: dict(crossover=24576, speedup_at=1.08, below=16384, speedup_below=0.8, max_S=65536, flash_wins=False),
        64: dict(crossover=None, speedup_at=None, below=None, speedup_below=None, max_S=65536, flash_wins=True),
    }
    lines = bench.table_lines("H100", results, "2026-01-01")
    pasted = eval("{" + "\n".join(lines) + "\n}")  # the printed lines are Python dict entries
    assert pasted == {("H100", 128): 24576, ("H100", 64): "flash_attn"}
    assert "('H100', 64): sparse never won up to 65536: remove any entry" in lines[1]
    assert "sparse 1.08x at 24576, dense 1.25x at 16384" in lines[0]


@pytest.mark.parametrize("heads,want", [(32, (4, 2, 1, 25)), (28, (3, 1, 1, 23)), (4, (1, 1, 1, 1))])
def test_mixed_config_makeup(heads, want):
    bench = load("bench_e2e")
    info = ModelInfo("m", "llama", num_layers=3, num_heads=heads, num_kv_heads=4, head_dim=128)
    config = bench.mixed_config(info)
    assert config == bench.mixed_config(info)  # deterministic
    for layer in config.layers:
        counts = Counter(h.pattern for h in layer)
        assert tuple(counts[p] for p in ("dense", "a_shape", "block_sparse", "vertical_slash")) == want
    assert [h.pattern for h in config.layers[0]] != [h.pattern for h in config.layers[1]]  # shuffled per layer
    budgets = {(h.params["vertical"], h.params["slash"]) for h in config.layers[0] if h.pattern == "vertical_slash"}
    assert len(budgets) == min(5, want[3])  # per-head budgets
    assert config.min_seq_len == "auto"


def test_targets_report_met_and_missed():
    targets = load("bench_e2e").targets
    rows = [
        {"model": "llama3-8b", "config": "vertical_slash", "S": 131072, "speedup": 2.6, "mem_vs_dense": 1.02},
        {"model": "llama3-8b", "config": "vertical_slash", "S": 65536, "speedup": 1.4, "mem_vs_dense": 1.07},
        {"model": "llama3-8b", "config": "mixed", "S": 32768, "speedup": 3.0, "mem_vs_dense": 1.0},
    ]
    md = "\n".join(targets(rows))
    assert "| TTFT >= 2.5x at 128K | 2.600x | yes |" in md
    assert "| TTFT >= 1.5x at 64K | 1.400x | NO |" in md
    assert "32K" not in md  # no vertical-slash row there
    assert "| peak memory <= dense x1.05 | x1.070 (worst length) | NO |" in md


def test_e2e_smoke_run(tmp_path, capsys):
    bench = load("bench_e2e")
    out = tmp_path / "e2e"
    assert bench.main(["--smoke", "--models", "llama3-8b,qwen2-7b,qwen3-8b", "--out", str(out)]) == 0
    table = list(csv.DictReader(open(f"{out}.csv")))
    configs = ["dense", "ceiling", "vertical_slash", "mixed"] + (["adaptive"] if "adaptive" in PATTERN_DEFAULTS else [])
    assert [(r["model"], r["S"], r["config"]) for r in table] == [
        (m, str(S), c) for m in ("llama3-8b", "qwen2-7b", "qwen3-8b") for S in (128, 256) for c in configs
    ]
    by = {(r["model"], r["S"], r["config"]): r for r in table}
    assert by["llama3-8b", "128", "vertical_slash"]["path"].startswith("dense fallback: kv_len 128 < min_seq_len 200")
    assert by["llama3-8b", "256", "mixed"]["path"] == by["qwen3-8b", "256", "vertical_slash"]["path"] == "sparse 2/2"
    assert float(by["qwen2-7b", "256", "dense"]["speedup"]) == 1.0
    ceiling = by["qwen2-7b", "256", "ceiling"]
    assert float(ceiling["of_ceiling"]) == pytest.approx(1.0) and float(ceiling["attn_ms_per_layer"]) == 0.0
    assert all(r["torch"] and r["transformers"] and r["device"].startswith("CPU") for r in table)
    md = open(f"{out}.md").read()
    assert "SMOKE RUN" in md and "## llama3-8b: TTFT" in md and md.count("decode check:") == 3
    assert "6 decode attention calls (3 steps x 2 layers), all on transformers' stock SDPA" in md


def test_e2e_budget_skips_groups(tmp_path):
    bench = load("bench_e2e")
    out = tmp_path / "e2e"
    assert bench.main(["--smoke", "--models", "llama3-8b", "--budget-s", "0", "--out", str(out)]) == 0
    assert list(csv.DictReader(open(f"{out}.csv"))) == []
    assert "- skipped: llama3-8b at 256" in open(f"{out}.md").read()


def test_fallback_smoke_run(capsys):
    load("bench_fallback").main(["--smoke", "--models", "llama3-8b"])
    out = capsys.readouterr().out
    assert "patched path: kv_len 128 < min_seq_len" in out  # the patched model really took the fallback
    assert "max |dense - patched| = 0\n" in out  # which is stock SDPA: the same logits, bit for bit
    assert "interleaved x2: dense median" in out and out.count("top kernels:") == 2


def test_crossover_smoke_run(tmp_path):
    import json

    bench = load("bench_crossover")
    out = tmp_path / "xo"
    assert bench.main(["--smoke", "--head-dims", "64", "--inputs", "random", "--out", str(out)]) == 0
    record = json.loads(open(f"{out}.json").read())
    assert record["smoke"] and record["meta"]["device_class"] == "cpu"
    assert [(r["head_dim"], r["S"]) for r in record["rows"]] == [(64, 256), (64, 512), (64, 1024)]
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in record["rows"])
    assert "Table lines" in open(f"{out}.md").read()


def test_compare_evals_names_each_runs_adaptive_thresholds():
    from sparse_prefill.tools.compare_evals import _describe as describe

    def results(*heads):
        return {"meta": {"config": {"source": "cfg.json", "json": {"layers": [list(heads)]}}}}

    adaptive = {"pattern": "adaptive", "gamma": 0.9, "tau": 0.1}
    assert describe(results({"pattern": "dense"})) == "cfg.json"
    assert describe(results(adaptive, {"pattern": "dense"})) == "cfg.json (1 adaptive heads: gamma 0.9, tau 0.1)"
    mixed = results(adaptive, {**adaptive, "gamma": 0.8}, {**adaptive, "gamma": 0.9})
    assert describe(mixed) == "cfg.json (3 adaptive heads: gamma 0.8 / 0.9, tau 0.1)"


def test_recall_bench_keeps_everything_dense_and_less_at_a_lower_gamma(smollm2, passkey):
    from sparse_prefill import SparseConfig
    from sparse_prefill.patches import adapter_for

    bench = load("bench_recall")
    model, _ = smollm2
    info = adapter_for(model).model_info(model)
    specs = bench.settings(SparseConfig.uniform(info, "dense"), [1.0, 0.5])
    out = bench.measure(model, passkey[0], specs, seed=0)
    assert list(out) == ["config", "adaptive, gamma 1.0", "adaptive, gamma 0.5"]
    assert out["config"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)  # dense: every tile, all the attention
    assert out["adaptive, gamma 1.0"][1:] == pytest.approx([1.0, 1.0], abs=1e-5)  # every key with mass is kept
    (d_full, _, _), (d_half, uniform, last) = out["adaptive, gamma 1.0"], out["adaptive, gamma 0.5"]
    assert d_half < d_full and uniform < 0.999 and last >= 0.5


def test_recall_bench_writes_its_table(tmp_path):
    out = tmp_path / "recall.md"
    argv = ["--tasks", "passkey", "--length", "1k", "--gammas", "0.9", "--out", str(out)]
    assert load("bench_recall").main(argv) == 0
    text = out.read_text()
    assert "`python benchmarks/bench_recall.py --tasks passkey --length 1k --gammas 0.9 --out" in text
    assert "## passkey, " in text and "| config | " in text and "| adaptive, gamma 0.9 | " in text


def test_layer_smoke_run(tmp_path):
    bench = load("bench_layer")
    out = tmp_path / "layer"
    bench.main(["--smoke", "--providers", "a_shape", "--lengths", "256", "--out", str(out)])
    table = list(csv.DictReader(open(out / "bench_layer.csv")))
    assert [(r["shape"], r["S"], r["input"], r["provider"]) for r in table] == [
        ("tiny", "256", i, p) for i in ("random", "structured") for p in ("sdpa_cudnn", "sdpa_flash", "a_shape")
    ]


def test_layer_smoke_run_of_one_config_layer(tmp_path):
    """--config runs one layer of a shipped config at its model's shape, its heads' own budgets, once per
    --slash-select."""
    bench = load("bench_layer")
    out = tmp_path / "layer"
    args = ["--smoke", "--config", "Qwen/Qwen2.5-7B-Instruct", "--layer", "3", "--slash-select", "token,block"]
    bench.main([*args, "--lengths", "256", "--inputs", "random", "--out", str(out)])
    table = list(csv.DictReader(open(out / "bench_layer.csv")))
    assert [(r["shape"], r["provider"]) for r in table] == [
        ("Qwen2.5-7B-Instruct", p) for p in ("sdpa_cudnn", "sdpa_flash", "config:L3:token", "config:L3:block")
    ]
    assert all(float(r["err_vs_pattern"]) < 0.02 for r in table[2:])
    heads = bench.config_providers(bench.find_config("qwen2.5-7b-instruct"), 3, "block")["config:L3:block"]
    assert len(heads) == 28 and {h.params["slash_select"] for h in heads if h.pattern == "vertical_slash"} == {"block"}
    with pytest.raises(SystemExit, match="--layer: must be in"):
        bench.main(["--smoke", "--config", "qwen2.5-7b-instruct", "--layer", "28"])


def test_long_smoke_run(tmp_path):
    bench = load("bench_long")
    out = tmp_path / "long"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    table = list(csv.DictReader(open(f"{out}.csv")))
    got = [(r["S"], r["config"], r["extrapolated"] != "") for r in table]
    assert got == [
        ("256", "sparse", False), ("512", "sparse", False), ("256", "ceiling", False), ("512", "ceiling", False),
        ("256", "dense", False), ("512", "dense", True),
    ]  # fmt: skip
    by = {(r["S"], r["config"]): r for r in table}
    assert by["512", "sparse"]["path"] == "sparse 2/2" and 0 < float(by["512", "sparse"]["density"]) <= 1
    assert by["512", "dense"]["extrapolated"].startswith("ceiling + ") and float(by["256", "dense"]["speedup"]) == 1
    assert all(float(r["host_rss_gb"]) > 0 and r["chunk"] == "128" for r in table if r["config"] != "dense")
    md = open(f"{out}.md").read()
    assert "SMOKE RUN" in md and "## qwen2.5-7b-1m: TTFT, chunked prefill" in md and "\\* extrapolated:" in md


def test_long_chunk_must_be_a_block_multiple(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("bench_long").main(["--smoke", "--chunk", "100", "--out", str(tmp_path / "long")])
    assert "--chunk: must be a positive multiple of 64" in capsys.readouterr().err


def test_bench_cpu_smoke(tmp_path):
    load("bench_cpu").main(["--smoke", "--out", str(tmp_path), "--tag", "smoke"])
    with open(tmp_path / "bench_cpu_smoke.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(load("bench_cpu").PROVIDERS)
    for row in table:
        assert 0 < float(row["density"]) <= 1 and float(row["sparse_ms"]) > 0 and float(row["err_vs_dense"]) < 1
    assert "sparse torch path vs dense SDPA" in (tmp_path / "bench_cpu_smoke.md").read_text()


def test_fidelity_needed_density_is_the_cheapest_setting_that_keeps_both_thresholds():
    fidelity = load("bench_fidelity")
    rows = [
        dict(length=8192, setting="a", density=0.3, top1=0.995, kl=0.02),  # KL too high
        dict(length=8192, setting="b", density=0.5, top1=0.991, kl=0.005),
        dict(length=8192, setting="c", density=0.7, top1=0.999, kl=0.001),
        dict(length=16384, setting="d", density=0.2, top1=0.98, kl=0.001),  # top-1 too low
    ]
    need = fidelity.needed(rows)
    assert need[8192]["setting"] == "b" and need[16384] is None


def test_fidelity_replot_draws_the_frontier_of_the_csv_rows(tmp_path):
    fidelity = load("bench_fidelity")
    row = dict(rope="none", recall=0.99, passkeys="", dense_passkeys="3/3")
    fidelity.write_csv(tmp_path / "a.csv", [dict(row, length=8192, setting="b", density=0.5, top1=0.991, kl=0.005)],
                       fidelity.COLUMNS, cell=str)  # fmt: skip
    fidelity.write_csv(tmp_path / "b.csv", [dict(row, length=32768, setting="d", density=0.9, top1=0.98, kl=0.001)],
                       fidelity.COLUMNS, cell=str)  # fmt: skip
    read = fidelity.read_rows(tmp_path / "a.csv")
    assert read[0]["length"] == 8192 and read[0]["density"] == 0.5 and read[0]["setting"] == "b"
    out = tmp_path / "plot"
    assert fidelity.main(["--replot", f"{tmp_path / 'a.csv'},{tmp_path / 'b.csv'}", "--out", str(out)]) == 0
    assert (out / "needed_density.png").stat().st_size > 0 and not (out / "fidelity.md").exists()
