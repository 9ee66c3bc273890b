"""Split models: accelerate's device_map (CPU and disk offload) and transformers tensor parallelism (2 gloo ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_close, spec, tiny_model
from sparse_prefill import SparseConfig, last_report, patch_model, report_json, save_config, unpatch_model
from sparse_prefill.dispatch import sparse_prefill_attention
from sparse_prefill.parallel import head_shard, shard_heads
from sparse_prefill.report import gather_report
from sparse_prefill.patches import adapter_for

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
VS = dict(last_q=16, force_vertical=2, force_slash=4)
# A different pattern on every head of the tiny model (4 query heads, 2 layers): a rank that took the wrong slice of
# the config would compute other heads' patterns and change the logits.
MIXED = [
    [
        spec("vertical_slash", vertical=8, slash=4, **VS),
        spec("a_shape", sink=2, local=16),
        spec("block_sparse", top_k=1),
        spec("dense"),
    ],
    [
        spec("block_sparse", top_k=2),
        spec("dense"),
        spec("a_shape", sink=4, local=32),
        spec("vertical_slash", vertical=16, slash=8, **VS),
    ],
]


def mixed_config(model, layers=MIXED) -> SparseConfig:
    config = SparseConfig.uniform(adapter_for(model).model_info(model), min_seq_len=0)
    config.layers = [list(heads) for heads in layers]
    return config


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# --- head slices under tensor parallelism --------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,tp", [(32, 8, 1), (32, 8, 2), (32, 8, 4), (32, 8, 8), (4, 2, 2), (9, 3, 3)])
def test_shards_tile_the_heads_and_keep_gqa_groups_on_one_rank(heads, kv_heads, tp):
    shards = [shard_heads(heads, kv_heads, tp, r) for r in range(tp)]
    assert [h for s in shards for h in s.q_heads] == list(range(heads))
    assert [h for s in shards for h in s.kv_heads] == list(range(kv_heads))
    group = heads // kv_heads
    for s in shards:
        assert len(s.q_heads) == heads // tp and (s.rank, s.size) == (shards.index(s), tp)
        # Local query head j reads local KV head j // group (what SDPA and the kernels do on the rank) and that is
        # the global KV head its global id reads.
        for j, h in enumerate(s.q_heads):
            assert s.kv_heads[j // group] == h // group


@pytest.mark.parametrize(
    "args,match",
    [
        ((32, 8, 3, 0), "num_heads=32 does not divide by the tensor-parallel size 3"),
        ((32, 8, 16, 0), "num_kv_heads=8 does not divide by the tensor-parallel size 16"),
        ((32, 8, 2, 2), r"rank: must be an integer in \[0, 2\)"),
        ((32, 8, 0, 0), "tp_size: must be a positive integer"),
        ((30, 8, 2, 0), "not a multiple of num_kv_heads"),
    ],
)
def test_shard_heads_rejects_splits_that_cut_heads(args, match):
    with pytest.raises(ValueError, match=match):
        shard_heads(*args)


def test_unsharded_projections_hold_every_head():
    model = tiny_model()
    info = adapter_for(model).model_info(model)
    shard = head_shard(*adapter_for(model).head_projections(model.model.layers[0].self_attn), info)
    assert (shard.q_heads, shard.kv_heads, shard.rank, shard.size, shard.group) == (range(4), range(2), 0, 1, None)
    assert head_shard(None, None, info) == shard  # a module without separate q/k projections: taken as unsharded


def test_a_call_with_other_heads_than_patched_is_an_error():
    model = tiny_model()
    patch_model(model, mixed_config(model))
    module = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 2, 300, 16), torch.randn(1, 1, 300, 16)
    with pytest.raises(ValueError, match=r"2 query heads, but the patch holds 4 \(global heads 0..3\)"):
        sparse_prefill_attention(module, q, kv, kv, None)


def test_single_process_report_lists_every_global_head():
    model = tiny_model()
    patch_model(model, mixed_config(model))
    logits(model)
    report = gather_report(model)
    assert [r["heads"] for r in report] == [[0, 1, 2, 3]] * 2
    assert report[1]["patterns"] == ["block_sparse", "dense", "a_shape", "vertical_slash"]
    assert report == _json(model)


def _json(model):
    return json.loads(report_json(model))


# --- accelerate device_map -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(path)
    return path


def test_device_map_with_cpu_and_disk_offload_matches_one_device(saved_model, tmp_path):
    # Layer 1 lives on disk: accelerate loads its weights into the layer only for its forward.
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    split = AutoModelForCausalLM.from_pretrained(saved_model, device_map=device_map, offload_folder=tmp_path).eval()
    assert hasattr(split.model.layers[1], "_hf_hook") and split.model.layers[1].self_attn.q_proj.weight.is_meta
    whole = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    dense = logits(split)
    config = mixed_config(whole)
    patch_model(whole, config)
    patch_model(split, config)
    got = logits(split)
    assert [r.path for r in last_report(split)] == ["sparse", "sparse"]
    assert (got - dense).abs().max() > 1e-2  # the sparse path changed the output
    assert_close(got, logits(whole), 1e-5, 1e-5)
    assert last_report(split)[1].density == last_report(whole)[1].density
    with torch.no_grad():
        tokens = split.generate(IDS, max_new_tokens=5, do_sample=False)
        assert torch.equal(tokens, whole.generate(IDS, max_new_tokens=5, do_sample=False))
    unpatch_model(split)
    assert torch.equal(logits(split), dense)


@pytest.mark.gpu
@pytest.mark.parametrize("placement", [("cpu", 0), (0, 1)], ids=["cpu+cuda0", "cuda0+cuda1"])
def test_gpu_device_map_runs_each_layer_on_its_device(tmp_path, placement):
    needed = max(p + 1 for p in placement if isinstance(p, int))
    if torch.cuda.device_count() < needed:
        pytest.skip(f"needs {needed} CUDA device(s)")
    tiny_model(head_dim=64).save_pretrained(tmp_path)  # a head_dim the kernels take
    first, second = placement
    device_map = {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        "model.layers.0": first,
        "model.layers.1": second,
        "model.norm": second,
        "lm_head": second,
    }
    split = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, dtype=torch.bfloat16).eval()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).to("cuda:0").eval()
    config = mixed_config(whole)
    patch_model(whole, config)
    patch_model(split, config)
    torch.cuda.set_device(0)  # the layer on another device must not run its kernel here
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(2))
    want = logits(whole, ids.to("cuda:0"))
    got = logits(split, ids.to("cuda:0"))  # a "cpu" entry next to GPUs is CPU offload: it executes on cuda:0
    assert [r.path for r in last_report(split)] == ["sparse", "sparse"]
    assert last_report(split)[1].index.col_idx.device == torch.device("cuda", second)
    assert_close(got.to("cuda:0"), want, 3e-2, 3e-2)
    with torch.no_grad():
        a = split.generate(ids.to("cuda:0"), max_new_tokens=4, do_sample=False).cpu()
        b = whole.generate(ids.to("cuda:0"), max_new_tokens=4, do_sample=False).cpu()
    assert a.shape == b.shape == (1, 704)


# --- transformers tensor parallelism, 2 processes ------------------------------------------------------------------


def run_ranks(model_dir: Path, config: SparseConfig, ids: torch.Tensor, out: Path, dtype: str, cpu: bool) -> list:
    """tests/tp_worker.py on 2 ranks under torchrun; each rank's results."""
    save_config(config, out / "config.json")
    torch.save(ids, out / "ids.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if cpu:  # gloo on the CPU whatever the machine has
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [str(ROOT / "tests" / "tp_worker.py"), str(model_dir), str(out / "config.json"), str(out / "ids.pt")]
    result = subprocess.run(command + args + [str(out), dtype], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_tensor_parallel_two_ranks_match_one_process(saved_model, tmp_path):
    whole = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    config = mixed_config(whole)
    ranks = run_ranks(saved_model, config, IDS, tmp_path, "float32", cpu=True)

    patch_model(whole, config)
    want = logits(whole)
    with torch.no_grad():
        want_tokens = whole.generate(IDS, max_new_tokens=4, do_sample=False)
    want_report = _json(whole)
    for r, got in enumerate(ranks):
        assert got["tp_size"] == 2 and got["q_proj_local_rows"] == 2 * 16  # each rank really held 2 of the 4 heads
        assert got["unsplit_k_proj"] == f"q_proj is ({r}, 2) but k_proj is unsplit"
        heads = [2 * r, 2 * r + 1]
        assert got["local"] == [(heads, [MIXED[layer][h].pattern for h in heads], "sparse") for layer in range(2)]
        assert_close(got["logits"], want, 1e-5, 1e-5)
        assert torch.equal(got["tokens"], want_tokens)
        for mine, ref in zip(got["report"], want_report):
            assert (mine["heads"], mine["patterns"], mine["path"]) == (ref["heads"], ref["patterns"], ref["path"])
            assert mine["density"][0] == pytest.approx(ref["density"][0])

    # The check has teeth: the same config with the ranks' halves swapped gives other logits.
    swapped = mixed_config(whole, [heads[2:] + heads[:2] for heads in MIXED])
    patch_model(whole, swapped)
    assert (logits(whole) - ranks[0]["logits"]).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_tensor_parallel_two_gpus_match_one_gpu(tmp_path):
    tiny_model(head_dim=64).save_pretrained(tmp_path / "model")  # a head_dim the kernels take
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16).to("cuda:0").eval()
    config = mixed_config(whole)
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(2))
    ranks = run_ranks(tmp_path / "model", config, ids, tmp_path, "bfloat16", cpu=False)  # NCCL, Triton on each GPU
    patch_model(whole, config)
    want = logits(whole, ids.to("cuda:0")).cpu()
    for r, got in enumerate(ranks):
        heads = [2 * r, 2 * r + 1]
        assert got["local"] == [(heads, [MIXED[layer][h].pattern for h in heads], "sparse") for layer in range(2)]
        assert [(e["heads"], e["patterns"]) for e in got["report"]] == [
            (e["heads"], e["patterns"]) for e in _json(whole)
        ]
        assert_close(got["logits"], want, 5e-2, 5e-2)
