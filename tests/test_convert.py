"""sparse_prefill.convert: MInference's per-head search results -> sparse_prefill/1, checked against a naive
restatement of MInference's run-time selection rule."""

import json
import math

import pytest
import torch
from transformers import AutoConfig

from sparse_prefill.config import ConfigError, ModelInfo, load_config
from sparse_prefill.convert import convert_minference, main
from sparse_prefill.index import BLOCK
from sparse_prefill.masks import token_mask
from sparse_prefill.plan import build_index

INFO = ModelInfo("tiny", "llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
# One layer of each kind of head: free top-k picks above the forced entries, budgets under MInference's floors (and a
# slash budget under its 100 forced diagonals), budgets over the prompt length, and an A-shape head.
HEADS = [
    ["vertical_and_slash", 45, 110, 0.91],
    ["vertical_and_slash", 5, 10, 0.5],
    ["vertical_and_slash", 1000, 6096, 0.99],
    ["stream_llm", 4, 40, 0.8],
]


def minference_file(tmp_path, layers):
    path = tmp_path / "Tiny_kv_out_v32_fit_o_best_pattern.json"
    path.write_text(json.dumps([{str(h): entry for h, entry in enumerate(heads)} for heads in layers]))
    return path


def top(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest entries' indices; ties (only among forced, infinite entries) to the lowest index."""
    return torch.sort(-scores, stable=True).indices[:k].tolist()


def minference_vertical_slash(q: torch.Tensor, k: torch.Tensor, a: int, b: int) -> tuple[list[int], list[int]]:
    """MInference's rule for one head, restated naively: q, k [S, D] -> (key columns, diagonal offsets q - k).

    Budgets floored at 30 columns / 50 diagonals and clamped to S; causal softmax of the last 64 queries; summed per
    key column and per diagonal; the first 30 columns and the 100 nearest diagonals forced; top-k of each.
    """
    S, D = q.shape
    n_vertical, n_slash = min(S, max(a, 30)), min(S, max(b, 50))
    L = min(64, S)
    p = torch.zeros(L, S)
    for i in range(L):
        pos = S - L + i
        p[i, : pos + 1] = torch.softmax(q[pos] @ k[: pos + 1].T / math.sqrt(D), -1)
    vertical = p.sum(0)
    vertical[:30] = math.inf
    slash = torch.zeros(S)
    for i in range(L):
        pos = S - L + i
        slash.index_add_(0, pos - torch.arange(pos + 1), p[i, : pos + 1])  # key j lies on diagonal pos - j
    slash[:100] = math.inf
    return top(vertical, n_vertical), top(slash, n_slash)


def block_diagonals(offsets: list[int], n: int) -> set[int]:
    """The block diagonals a token diagonal crosses (query block m meets it in key blocks m - d): for offset o, the
    rows of a block (positions 64m .. 64m + 63) see keys 64m - o .. 64m + 63 - o, so d = floor(o / 64) and
    ceil(o / 64) (q_len == kv_len, no padding)."""
    return {d for o in offsets for d in (o // BLOCK, -(-o // BLOCK)) if d < n}


@pytest.mark.parametrize("S", [1041, 257, 80])
def test_converted_heads_select_what_minference_selects(tmp_path, S):
    """Exact: each vertical-slash head's key columns equal MInference's top columns, and its block diagonals are
    exactly those its top token diagonals cross (the kernel's block-granular form of them: at 1041 keys the few
    diagonals picked past the forced 100 each turn on their own block diagonals); every (query, key) pair MInference
    keeps is computed. The A-shape head (``stream_llm``) keeps exactly the first ``a`` columns and the
    block diagonals of the ``b`` nearest diagonals, again covering MInference's pairs."""
    heads = convert_minference(minference_file(tmp_path, [HEADS, HEADS]), INFO).layers[0]
    torch.manual_seed(S)
    q, k = torch.randn(1, 4, S, 16), torch.randn(1, 2, S, 16)
    index = build_index(q, k, heads, 16**-0.5, [0])
    mask = token_mask(index)[0]
    n = index.num_k_blocks
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    diag_of = torch.arange(S)[:, None] - torch.arange(S)[None, :]
    for h, (pattern, a, b, _) in enumerate(HEADS):
        qh, kh = q[0, h], k[0, h // 2]
        if pattern == "vertical_and_slash":
            columns, offsets = minference_vertical_slash(qh, kh, a, b)
        else:
            columns, offsets = list(range(min(a, S))), list(range(min(b, S)))
        got_columns = index.col_idx[0, h, : index.col_cnt[0, h]].tolist()
        assert got_columns == sorted(columns), f"head {h}"
        assert set(index.diag_mask[0, h].nonzero().flatten().tolist()) == block_diagonals(offsets, n), f"head {h}"
        on_column = torch.isin(torch.arange(S), torch.tensor(columns))[None, :]
        kept = causal & (on_column | torch.isin(diag_of, torch.tensor(offsets)))
        assert not (kept & ~mask[h]).any(), f"head {h}: a pair MInference keeps is not computed"


def test_conversion_maps_every_field(tmp_path):
    layers = [HEADS, list(reversed(HEADS))]
    config = convert_minference(
        minference_file(tmp_path, layers), INFO, hub_ids=["org/Tiny-Instruct"], commit="abc123"
    )
    assert config.model.hub_ids == ("org/Tiny-Instruct",) and config.model.num_heads == 4
    vs = dict(last_q=64, force_vertical=30, force_slash=100, slash_select="token")
    first = config.layers[0]
    assert first[0].params == {"vertical": 45, "slash": 110, **vs}
    assert first[1].params == {"vertical": 30, "slash": 50, **vs, "force_slash": 50}  # floors; forced within budget
    assert first[2].params == {"vertical": 1000, "slash": 6096, **vs}
    assert (first[3].pattern, first[3].params) == ("a_shape", {"sink": 4, "local": 40})
    assert [s.pattern for s in config.layers[1]] == ["a_shape", "vertical_slash", "vertical_slash", "vertical_slash"]
    p = config.provenance
    assert p["tool"] == "sparse_prefill.convert" and p["commit"] == "abc123" and p["license"].startswith("MIT")
    assert p["source"].endswith("minference/configs/Tiny_kv_out_v32_fit_o_best_pattern.json")
    assert p["score"] == [[0.91, 0.5, 0.99, 0.8], [0.8, 0.99, 0.5, 0.91]]


def test_conversion_from_a_transformers_config(tmp_path):
    shape = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    hf = AutoConfig.for_model("qwen2", **shape)
    config = convert_minference(minference_file(tmp_path, [HEADS, HEADS]), hf, name="Tiny-Qwen")
    assert config.model == ModelInfo("Tiny-Qwen", "qwen2", 2, 4, 2, 16)


@pytest.mark.parametrize(
    "layers,message",
    [
        ([HEADS], "must list model.num_layers=2 layers, got 1"),
        ([HEADS, HEADS[:3]], "layer 1 must map head indices 0..3"),
        ([HEADS, [*HEADS[:3], ["block_sparse", 10, 1, 0.9]]], "head 3: pattern 'block_sparse' is not converted"),
        ([HEADS, [*HEADS[:3], ["vertical_and_slash", 0, 100, 0.9]]], "layer 1 head 3: must be [pattern, a, b, score]"),
    ],
)
def test_bad_files_are_refused_with_the_place(tmp_path, layers, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        convert_minference(minference_file(tmp_path, layers), INFO)


def test_cli_writes_a_loadable_config(tmp_path, capsys):
    source, out = minference_file(tmp_path, [HEADS, HEADS]), tmp_path / "out.json"
    shape = ["--model-type", "llama", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
    assert main([str(source), str(out), *shape, "--hub-id", "org/Tiny", "--commit", "abc"]) == 0
    config = load_config(out)
    assert config.model == ModelInfo("Tiny_kv_out_v32_fit_o_best_pattern", "llama", 2, 4, 2, 16)
    assert config.model.hub_ids == ("org/Tiny",)
    assert config.layers == convert_minference(source, INFO).layers
    folder = tmp_path / "Tiny-Llama"
    AutoConfig.for_model(
        "llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64
    ).save_pretrained(folder)
    assert main([str(source), str(out), "--hf-config", str(folder)]) == 0
    assert load_config(out).model.name == "Tiny-Llama"
    with pytest.raises(SystemExit):
        main([str(source), str(out), "--model-type", "llama"])
    assert "--hf-config, or --model-type" in capsys.readouterr().err
