"""Offline calibration: recall and density scoring, the per-head choice, prompts, and the command line.

Synthetic q/k only, plus a tiny random Llama built from a config (no download, no SmolLM2)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model

from sparse_prefill.tools import calibrate as C
from sparse_prefill.tools.cli import parse_lengths
from sparse_prefill.config import (
    DEFAULT_MIN_SEQ_LEN,
    PATTERN_DEFAULTS,
    HeadSpec,
    ModelInfo,
    SparseConfig,
    load_config,
    save_config,
)
from sparse_prefill.masks import token_mask
from sparse_prefill.patch import is_patched, patch_model, unpatch_model
from sparse_prefill.plan import build_index
from sparse_prefill.report import tile_density

S, D = 1024, 64


def spec(pattern: str, **params) -> HeadSpec:
    return HeadSpec(pattern, {**PATTERN_DEFAULTS[pattern], **params})


def typed_head(c: float, special: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [S, D] with logit(i, j) = -c (i - j) for ordinary keys and ``special[j]`` for the keys listed: mass
    decays with distance (a local window of about 3 / c keys), plus keys every query sees at a fixed logit."""
    i = torch.arange(S, dtype=torch.float64)
    q, k = torch.zeros(S, D, dtype=torch.float64), torch.zeros(S, D, dtype=torch.float64)
    q[:, 0], q[:, 1], q[:, 2], q[:, 3] = c, -c * i, c * i, 1.0
    k[:, 0], k[:, 1] = i, 1.0
    for j, s in special.items():
        k[j, 2], k[j, 3] = 1.0, s - c * j  # cancels the distance term: logit s for every query
    return q.float(), k.float()


def block_head(gain: float, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [S, D] where each query block attends to one random earlier key block as a whole (block-sparse)."""
    n = S // 64
    target = [0, 0] + [rng.randrange(m - 1) for m in range(2, n)]
    q, k = torch.zeros(S, D), torch.zeros(S, D)
    for m in range(n):
        q[m * 64 : (m + 1) * 64, target[m]] = gain
        k[m * 64 : (m + 1) * 64, m] = 1.0
    return q, k


@pytest.fixture(scope="module")
def synthetic():
    """A layer of three heads (one KV head each): A-shape, vertical-slash, block-sparse."""
    sinks = {j: 2.0 for j in range(4)}
    heads = [
        typed_head(3 / 300, sinks),  # sinks + a wide local window
        typed_head(0.2, {**sinks, **{100 + 57 * t: 1.0 for t in range(16)}}),  # + scattered columns, narrow local
        block_head(7.0, random.Random(0)),
    ]
    q = torch.stack([h[0] for h in heads])[None]
    k = torch.stack([h[1] for h in heads])[None]
    return q, k


SMALL_GRID = [
    spec("a_shape", sink=64, local=0.3),
    spec("block_sparse", top_k=0.25),
    spec("vertical_slash", vertical=0.06, slash=0.02),
    spec("dense"),
]


def test_search_picks_the_known_pattern(synthetic):
    q, k = synthetic
    rec, dens = C.score_layer(q, k, 1.0, SMALL_GRID, C.row_groups(S, random.Random(0)))
    choice = C.select(rec[None, None], dens[None, None], SMALL_GRID, target=0.95)[0]
    assert [SMALL_GRID[c].pattern for c in choice.tolist()] == ["a_shape", "vertical_slash", "block_sparse"]
    # Each head's own pattern is the only sparse candidate that keeps its attention.
    assert torch.equal(rec[:3] >= 0.95, torch.eye(3, dtype=torch.bool)[[0, 2, 1]])


def test_search_with_the_default_grid(synthetic):
    q, k = synthetic
    rec, dens = C.score_layer(q, k, 1.0, C.CANDIDATES, C.row_groups(S, random.Random(0)))
    choice = C.select(rec[None, None], dens[None, None], C.CANDIDATES, target=0.95)[0].tolist()
    # A vertical-slash head that picks its slash blocks by mass can also be a sink + local window.
    assert C.CANDIDATES[choice[0]].pattern in ("a_shape", "vertical_slash")
    assert [C.CANDIDATES[c].pattern for c in choice[1:]] == ["vertical_slash", "block_sparse"]
    assert all(rec[c, h] >= 0.95 and dens[c, h] < 0.7 for h, c in enumerate(choice))


def test_heads_nothing_sparse_fits_stay_dense(synthetic):
    q, k = synthetic
    grid = [SMALL_GRID[0], SMALL_GRID[-1]]  # A-shape or dense
    rec, dens = C.score_layer(q, k, 1.0, grid, C.row_groups(S, random.Random(0)))
    choice = C.select(rec[None, None], dens[None, None], grid, target=0.95)[0]
    assert [grid[c].pattern for c in choice.tolist()] == ["a_shape", "dense", "dense"]


def test_a_head_whose_need_varies_by_prompt_goes_adaptive():
    """A head that needs nearly every key on one prompt and only its sinks and local window on another: a static
    pattern pays the first prompt's cost on both, an adaptive one each prompt's own."""
    sinks = {j: 2.0 for j in range(4)}
    scored = [
        C.score_layer(q[None, None], k[None, None], 1.0, C.CANDIDATES, C.row_groups(S, random.Random(i)))
        for i, (q, k) in enumerate([typed_head(0.006, sinks), typed_head(0.2, sinks)])
    ]
    rec, dens = (torch.stack(t)[:, None] for t in zip(*scored))  # [2 prompts, 1 layer, C, 1 head]
    choice = C.select(rec, dens, C.CANDIDATES, target=0.95)[0, 0]
    assert C.CANDIDATES[choice].pattern == "adaptive"
    assert dens[0, 0, choice, 0] == 1 and dens[1, 0, choice, 0] < 0.5  # dense where needed, sparse where not
    static = [c for c, spec in enumerate(C.CANDIDATES) if spec.pattern != "adaptive"]
    without = C.select(rec[:, :, static], dens[:, :, static], [C.CANDIDATES[c] for c in static], target=0.95)[0, 0]
    assert C.CANDIDATES[static[without]].pattern == "dense"
    # On the first prompt alone adaptive runs dense too: dense wins the tie, as it needs no estimate.
    assert C.CANDIDATES[C.select(rec[:1], dens[:1], C.CANDIDATES, target=0.95)[0, 0]].pattern == "dense"


def full_recall(q, k, index, scale, rows):
    """The definition: explicit [B, H, S, S] mask and softmax."""
    group = q.shape[1] // k.shape[1]
    logits = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    p = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    return (p * token_mask(index))[0].sum(-1)[:, rows].mean(-1)


@pytest.mark.parametrize("rows", [slice(None), slice(7, None, 5), slice(250, 300)])
def test_blockwise_recall_equals_full_matrix(rows):
    torch.manual_seed(0)
    Sq, H = 300, 4  # not a multiple of the block size; GQA with 2 KV heads
    q, k = torch.randn(1, H, Sq, 32) * 2, torch.randn(1, 2, Sq, 32) * 2
    k[:, :, :3] += q.mean((1, 2), keepdim=True)[:, :2] * 3  # some sink mass
    heads = [
        spec("a_shape", sink=3, local=40),
        spec("vertical_slash", vertical=20, slash=30, force_vertical=3, force_slash=5),
        spec("block_sparse", top_k=2),
        spec("dense"),
    ]
    uniform = spec("vertical_slash", vertical=0.1, slash=0.2)
    indexes = [build_index(q, k, heads, 0.2, [0]), build_index(q, k, [uniform] * H, 0.2, [0])]
    got = C.recall(q, k, indexes, 0.2, rows, chunk=37)
    for index, row in zip(indexes, got):
        torch.testing.assert_close(row, full_recall(q, k, index, 0.2, rows), rtol=0, atol=1e-5)
    assert got[0, -1] == pytest.approx(1.0, abs=1e-5) and (got[0, [0, 2]] < 0.99).all()  # not trivially all kept


def test_score_layer_is_recall_and_tile_density_per_candidate():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 200, 16), torch.randn(1, 2, 200, 16)
    grid = [
        spec("a_shape", sink=8, local=0.2),
        spec("vertical_slash", vertical=0.1, slash=0.2),
        spec("block_sparse", top_k=0.5),
    ]
    rows = [slice(0, 200, 3), slice(150, 200)]
    rec, dens = C.score_layer(q, k, 0.25, grid, rows)
    for c, cand in enumerate(grid):
        index = build_index(q, k, [cand] * 4, 0.25, [0])
        want = torch.stack([full_recall(q, k, index, 0.25, r) for r in rows]).amin(0)
        torch.testing.assert_close(rec[c], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(dens[c], tile_density(index)[0])


def test_budget_spends_density_where_it_buys_recall():
    grid = [spec("a_shape", sink=64, local=0.1), spec("a_shape", sink=64, local=0.3), spec("dense")]
    # 2 heads: head 0 gains much from the wider window, head 1 little.
    rec = torch.tensor([[0.95, 0.96], [0.99, 0.965], [1.0, 1.0]])[None, None]
    dens = torch.tensor([[0.2, 0.2], [0.5, 0.5], [1.0, 1.0]]).expand(1, 1, 3, 2)
    assert C.select(rec, dens, grid, 0.95)[0].tolist() == [0, 0]
    assert C.select(rec, dens, grid, 0.95, budget=0.35)[0].tolist() == [1, 0]
    assert C.select(rec, dens, grid, 0.95, budget=1.0)[0].tolist() == [2, 2]
    assert C.select(rec, dens, grid, 0.955, budget=0.2)[0].tolist() == [1, 0]  # the target is a floor


def test_layer_weights_move_the_budget_to_the_layer_that_needs_it():
    grid = [spec("a_shape", sink=64, local=0.1), spec("dense")]
    # 2 layers x 1 head; the budget pays for one dense head. Unweighted it goes where more recall is lost (layer 1);
    # when a unit of layer 0's lost recall costs 3x layer 1's, to layer 0.
    rec = torch.tensor([[[0.9], [1.0]], [[0.88], [1.0]]])[None]
    dens = torch.tensor([[[0.2], [1.0]], [[0.2], [1.0]]])[None]
    assert C.select(rec, dens, grid, 0.5, budget=0.61).tolist() == [[0], [1]]
    assert C.select(rec, dens, grid, 0.5, budget=0.61, layer_weight=torch.tensor([1.5, 0.5])).tolist() == [[1], [0]]


def test_sensitivity_weights_are_output_error_per_lost_recall():
    weights = C.sensitivity_weights(torch.tensor([0.02, 0.01, 0.0, 0.0]), torch.tensor([0.1, 0.1, 0.0, 0.2]))
    # rates 0.2, 0.1, (none: the mean of the measured 0.1), 0.0; then scaled to mean 1
    torch.testing.assert_close(weights, torch.tensor([0.2, 0.1, 0.1, 0.0]) / 0.1)
    assert C.sensitivity_weights(torch.zeros(3), torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_layer_sensitivity_is_each_layer_alone_against_dense(tiny_llama):
    info = ModelInfo("tiny", "llama", 2, 4, 2, 16)
    prompt = C.Prompt("natural", [random.Random(0).randrange(250) for _ in range(512)])
    local = [spec("a_shape", sink=64, local=0.05)] * 4
    dense = [spec("dense")] * 4
    kl = C.layer_sensitivity(tiny_llama, info, [prompt], [local, dense])
    assert kl[0] > 0 and kl[1] == 0  # an all-dense layer runs no forward and has no error
    assert tiny_llama.config._attn_implementation == "sdpa"  # unpatched after
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        want = torch.log_softmax(tiny_llama(ids).logits[0, -C.SENSITIVITY_ROWS :].float(), -1)
    patch_model(tiny_llama, C._config(info, [local, dense], 0, {}), min_seq_len=0)
    try:
        with torch.no_grad():
            got = torch.log_softmax(tiny_llama(ids).logits[0, -C.SENSITIVITY_ROWS :].float(), -1)
    finally:
        unpatch_model(tiny_llama)
    assert float(kl[0]) == pytest.approx(float(F.kl_div(got, want, reduction="batchmean", log_target=True)), rel=1e-5)


class CharTokenizer:
    """One token per character; enough of the tokenizer API for the prompt builders."""

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(ch) % 250 for ch in text]})()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_prompts_are_deterministic_and_mixed():
    tok = CharTokenizer()
    a = C.calibration_prompts(tok, [600, 900], 4, seed=3)
    b = C.calibration_prompts(tok, [600, 900], 4, seed=3)
    c = C.calibration_prompts(tok, [600, 900], 4, seed=4)
    assert [(p.kind, p.ids) for p in a] == [(p.kind, p.ids) for p in b]
    assert [p.ids for p in a] != [p.ids for p in c]
    assert {p.kind for p in a} == set(C.KINDS)
    for p in a:
        if p.kind != "passkey":  # the passkey prompt comes from sparse_prefill.tools.prompts and is approximately sized
            assert len(p.ids) in (600, 900)


def test_heldout_text_is_disjoint():
    calib, held = C.natural_text("calibration"), C.natural_text("heldout")
    assert len(held) > 50_000 and len(calib) > 3 * len(held)
    assert held[:2000] not in calib


@pytest.fixture(scope="module")
def tiny_llama():
    model = tiny_model(vocab_size=256, intermediate_size=128, max_position_embeddings=2048)
    model.set_attn_implementation("sdpa")
    return model


def test_capture_gets_post_rope_qk_and_restores(tiny_llama):
    ids = torch.arange(100)[None] % 256
    with C.capturing(tiny_llama) as layers, torch.no_grad():
        out = tiny_llama(ids).logits
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert sorted(layers) == [0, 1]
    q, k, scale = layers[0]
    assert q.shape == (1, 4, 100, 16) and k.shape == (1, 2, 100, 16) and scale == pytest.approx(0.25)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, out)  # capturing does not change the output


def test_sensitivity_reweighs_the_budget_and_is_recorded(tiny_llama):
    info = ModelInfo("tiny", "llama", 2, 4, 2, 16)
    kw = dict(samples=2, seed=5, target=0.3, budget=0.6, progress=False)
    config = C.calibrate(tiny_llama, CharTokenizer(), info, [512], sensitivity=1, **kw)
    weights = config.provenance["sensitivity"]["layer_weights"]
    assert len(weights) == 2 and sum(weights) == pytest.approx(2, abs=0.01)
    assert C.calibrate(tiny_llama, CharTokenizer(), info, [512], **kw).provenance["sensitivity"] is None
    with pytest.raises(ValueError, match="sensitivity: needs a budget"):  # nothing to re-spend: not ignored
        C.calibrate(tiny_llama, CharTokenizer(), info, [512], sensitivity=1, **{**kw, "budget": None})
    patch_model(tiny_llama, config)
    try:
        with pytest.raises(ValueError, match="sensitivity: the model is patched"):
            C.calibrate(tiny_llama, CharTokenizer(), info, [512], sensitivity=1, **kw)
        assert is_patched(tiny_llama)  # left as it was
    finally:
        unpatch_model(tiny_llama)


def test_calibrate_end_to_end_is_deterministic(tiny_llama, tmp_path):
    info = ModelInfo("tiny", "llama", 2, 4, 2, 16)

    def run():
        kw = dict(samples=2, seed=5, target=0.3, budget=0.6, progress=False)
        return C.calibrate(tiny_llama, CharTokenizer(), info, [512], **kw)

    a, b = run(), run()
    assert {**a.provenance, "seconds": 0} == {**b.provenance, "seconds": 0} and a.layers == b.layers
    prov = a.provenance
    assert prov["seed"] == 5 and prov["lengths"] == [512] and prov["recall_target"] == 0.3
    assert [s["kind"] for s in prov["samples"]] == ["natural", "multi_needle"]
    assert prov["patterns"] == ["a_shape", "block_sparse", "vertical_slash", "dense", "adaptive"]
    recall = [r for row in prov["recall"] for r in row]
    density = [d for row in prov["density"] for d in row]
    assert len(recall) == len(density) == 8 and min(recall) >= 0.3
    assert sum(density) / 8 <= 0.6 and min(density) < 1  # a random model's heads are diffuse, yet some go sparse
    save_config(a, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json").to_dict() == a.to_dict()
    assert "mean density" in C.summary(a)


def test_command_line_calibrates_with_the_patterns_asked_for(tiny_llama, tmp_path, monkeypatch, capsys):
    import sparse_prefill.tools.models as models

    monkeypatch.setattr(models, "load_model", lambda *args: (tiny_llama, CharTokenizer()))
    out = tmp_path / "c.json"
    argv = ["--model", str(tmp_path), "--lengths", "512", "--samples", "1", "--recall", "0.3", "--budget", "none"]
    assert C.main([*argv, "--patterns", "a_shape", "--out", str(out)]) == 0
    config = load_config(out)
    assert config.provenance["patterns"] == ["a_shape", "dense"]
    assert {h.pattern for row in config.layers for h in row} <= {"a_shape", "dense"}
    assert "a_shape" in {h.pattern for row in config.layers for h in row}  # a random model's heads fit it at 0.3
    assert "AD:0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "2x"], "bad length"),
        (["--lengths", "4k,"], "bad length"),
        (["--lengths", "100"], "bad length"),
        (["--recall", "1.5"], "(0, 1]"),
        (["--recall", "0"], "(0, 1]"),
        (["--samples", "0"], "must be an integer from 1"),
        (["--budget", "1.2"], "(0, 1]"),
        (["--model", "/no/such/model"], "--model"),
        (["--text", "/no/such/file.txt"], "--text"),
        (["--patterns", "vertical_slash,vs"], "unknown pattern 'vs'"),
        (["--patterns", "dense"], "unknown pattern 'dense'"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        C.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_arguments():
    assert parse_lengths("2k,4K, 6000") == [2048, 4096, 6000]
    args = C.parser().parse_args(["--budget", "none", "--recall", "1"])
    assert args.budget is None and args.recall == 1.0
    assert args.patterns == C.PATTERNS == ("a_shape", "block_sparse", "vertical_slash", "adaptive")
    assert C.parser().parse_args(["--patterns", "vertical_slash,adaptive"]).patterns == ("vertical_slash", "adaptive")


@pytest.fixture
def no_model_load(monkeypatch):
    """The model loader, made to fail the test if a command line reaches it."""
    import sparse_prefill.tools.models as models

    def load(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", load)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{tmp}"], "argument --out: {tmp} is a folder; expected a file"),
        (
            ["--out", "{tmp}/file.txt/c.json"],
            "--out: {tmp}/file.txt/c.json is under {tmp}/file.txt, which is a file",
        ),
        (["--lengths", "infk"], "bad length 'infk'"),
        (["--lengths", "2k,0"], "bad length '0'"),
        (["--lengths=-4k"], "bad length '-4k'"),
        (["--lengths", "4.5k"], "bad length '4.5k'"),
        (["--lengths", "9999999999k"], "bad length '9999999999k': expected token counts from 256 to 2147483647"),
        (["--samples", "1" + "0" * 30], "argument --samples: must be an integer from 1 to 2147483647"),
        (["--min-seq-len", "2147483648"], "argument --min-seq-len: must be an integer from 0 to 2147483647"),
        (["--text", "{tmp}/latin-1.txt"], "argument --text: cannot read {tmp}/latin-1.txt as UTF-8 text"),
        (["--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
        (["--budget", "none", "--sensitivity", "2"], "argument --sensitivity: needs a --budget"),
    ],
)
def test_bad_arguments_exit_2_before_the_model_loads(argv, message, tmp_path, no_model_load, capsys):
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "latin-1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(SystemExit) as e:
        C.main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err


@pytest.mark.skipif(sys.platform != "linux", reason="/proc takes no new files on Linux only")
def test_unwritable_out_exits_2_before_the_model_loads(no_model_load, capsys):
    # Not a chmod-ed folder: the tests may run as root, who can write there anyway.
    with pytest.raises(SystemExit) as e:
        C.main(["--out", "/proc/sparse-prefill/c.json"])
    assert e.value.code == 2
    assert "argument --out: cannot write /proc/sparse-prefill/c.json: cannot create files in /proc" in (
        capsys.readouterr().err
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_exits_2_before_the_model_loads(no_model_load, capsys):
    with pytest.raises(SystemExit) as e:
        C.main(["--device", "cuda"])
    assert e.value.code == 2
    assert "argument --device: 'cuda': CUDA is not available on this machine" in capsys.readouterr().err


def test_lengths_beyond_the_context_exit_2_before_calibrating(tiny_llama, tmp_path, monkeypatch, capsys):
    import sparse_prefill.tools.models as models

    def calibrate(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(models, "load_model", lambda *args: (tiny_llama, CharTokenizer()))
    monkeypatch.setattr(C, "calibrate", calibrate)
    with pytest.raises(SystemExit) as e:  # the tiny model's context is 2048 tokens
        C.main(["--model", str(tmp_path), "--lengths", "2k,4k", "--out", str(tmp_path / "c.json")])
    assert e.value.code == 2
    assert "argument --lengths: 4096 exceeds the model's context of 2048 tokens" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_script_wrapper_reports_bad_args():
    out = subprocess.run(
        [sys.executable, "-m", "sparse_prefill.tools.calibrate", "--recall", "2"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--recall" in out.stderr


def test_shipped_config_matches_smollm2():
    path = Path(C.__file__).resolve().parents[2] / "configs" / "smollm2-135m-instruct.json"
    config = load_config(path)
    assert config.model == ModelInfo("SmolLM2-135M-Instruct", "llama", 30, 9, 3, 64)
    # SmolLM2's context (8K) is below the measured crossover: patch_model runs it dense unless asked (min_seq_len=0).
    assert config.min_seq_len == DEFAULT_MIN_SEQ_LEN
    assert config.provenance["tool"] == "sparse_prefill.calibrate"
    assert isinstance(config, SparseConfig)
