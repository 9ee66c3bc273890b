"""Regenerate the shipped configs converted from MInference's published per-head search results.

    python scripts/convert_minference_configs.py --source ../shared/minference-configs --out configs

``--source`` holds MInference's ``minference/configs/*.json`` (MIT) at commit ``--commit``. One config per model
whose architecture has an adapter (sparse_prefill.patches); the hub ids are those MInference's ``model2path.py``
maps to the file, plus the native GLM conversion's. Shapes are the models' public ``config.json`` values
(``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, head_dim = hidden_size / heads); the
converter checks them against the file's layer and head counts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_prefill.config import ModelInfo, save_config  # noqa: E402
from sparse_prefill.convert import convert_minference  # noqa: E402

COMMIT = "fb56c917f618e8645f1cfc37535afd7424d78f0d"

# out file -> (MInference file, hub ids, (model_type, layers, heads, kv heads, head_dim)). The name is the first id's.
MODELS = {
    "llama-3-8b-instruct-262k.json": (
        "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json",
        [
            "gradientai/Llama-3-8B-Instruct-262k",
            "gradientai/Llama-3-8B-Instruct-Gradient-1048k",
            "gradientai/Llama-3-8B-Instruct-Gradient-4194k",
        ],
        ("llama", 32, 32, 8, 128),
    ),
    "llama-3.1-8b-instruct.json": (
        "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern_v2.json",
        ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct"],
        ("llama", 32, 32, 8, 128),
    ),
    "llama-3.1-70b-instruct.json": (
        "Llama_3.1_70B_Instruct_128k_kv_out_v32_fit_o_best_pattern_v2.json",
        ["meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Meta-Llama-3.1-70B-Instruct"],
        ("llama", 80, 64, 8, 128),
    ),
    "llama-3-70b-instruct-gradient-262k.json": (
        "Llama_3_70B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json",
        ["gradientai/Llama-3-70B-Instruct-Gradient-262k", "gradientai/Llama-3-70B-Instruct-Gradient-1048k"],
        ("llama", 80, 64, 8, 128),
    ),
    "yi-9b-200k.json": (
        "Yi_9B_200k_kv_out_v32_fit_o_best_pattern.json",
        ["01-ai/Yi-9B-200K"],
        ("llama", 48, 32, 4, 128),
    ),
    "phi-3-mini-128k-instruct.json": (
        "Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern.json",
        ["microsoft/Phi-3-mini-128k-instruct"],
        ("phi3", 32, 32, 32, 96),
    ),
    "qwen2-7b-instruct.json": (
        "Qwen2_7B_Instruct_128k_instruct_kv_out_v32_fit_o_best_pattern.json",
        ["Qwen/Qwen2-7B-Instruct"],
        ("qwen2", 28, 28, 4, 128),
    ),
    "qwen2.5-7b-instruct.json": (
        "Qwen2.5_7B_Instruct_128k_instruct_kv_out_v32_fit_o_best_pattern.json",
        ["Qwen/Qwen2.5-7B-Instruct"],
        ("qwen2", 28, 28, 4, 128),
    ),
    "qwen2.5-7b-instruct-1m.json": (
        "Qwen2.5_7B_Instruct_1M.json",
        ["Qwen/Qwen2.5-7B-Instruct-1M"],
        ("qwen2", 28, 28, 4, 128),
    ),
    "qwen2.5-14b-instruct-1m.json": (
        "Qwen2.5_14B_Instruct_1M.json",
        ["Qwen/Qwen2.5-14B-Instruct-1M"],
        ("qwen2", 48, 40, 8, 128),
    ),
    "qwen2.5-32b-instruct.json": (
        "Qwen2.5_32B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json",
        ["Qwen/Qwen2.5-32B-Instruct"],
        ("qwen2", 64, 40, 8, 128),
    ),
    "qwen2.5-72b-instruct.json": (
        "Qwen2.5_72B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json",
        ["Qwen/Qwen2.5-72B-Instruct"],
        ("qwen2", 80, 64, 8, 128),
    ),
    # transformers' native GLM conversion of THUDM/glm-4-9b-chat-1m (multi_query_group_num 4, kv_channels 128); the
    # remote-code original (model_type "chatglm") has no adapter.
    "glm-4-9b-chat-1m.json": (
        "GLM_4_9B_1M_instruct_kv_out_v32_fit_o_best_pattern.json",
        ["THUDM/glm-4-9b-chat-1m-hf", "zai-org/glm-4-9b-chat-1m-hf", "THUDM/glm-4-9b-chat-1m"],
        ("glm", 40, 32, 4, 128),
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="folder of MInference's config files")
    parser.add_argument("--out", type=Path, default=Path("configs"))
    parser.add_argument("--commit", default=COMMIT, help="the MInference commit of --source")
    args = parser.parse_args(argv)
    for out, (source, hub_ids, shape) in MODELS.items():
        info = ModelInfo(hub_ids[0].split("/")[-1], *shape)
        config = convert_minference(args.source / source, info, hub_ids=hub_ids, commit=args.commit)
        save_config(config, args.out / out)
        print(f"{out}: {source} -> {info.name} ({', '.join(map(str, shape))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
