"""One rank of the tensor-parallel test: ``torchrun --nproc-per-node N tests/tp_worker.py MODEL CONFIG IDS OUT DTYPE``.

Loads MODEL with transformers' tensor parallelism (the model's own tp_plan, one slice of the heads per rank),
patches it with CONFIG, runs a prefill and a short greedy generate on the token ids saved in IDS, and writes what
it saw to OUT/rank<r>.pt. Run by tests/test_multigpu.py; not a test itself.
"""

import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from sparse_prefill import last_report, patch_model
from sparse_prefill.parallel import head_shard
from sparse_prefill.report import gather_report
from sparse_prefill.patches import adapter_for


def main() -> None:
    model_dir, config_path, ids_path, out_dir, dtype = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(tp_plan="auto"), dtype=getattr(torch, dtype)
    ).eval()
    patch_model(model, config_path)
    info = adapter_for(model).model_info(model)
    ids = torch.load(ids_path).to(model.device)
    with torch.no_grad():
        logits = model(ids).logits
        local = [(list(r.heads), r.patterns, r.path) for r in last_report(model)]
        report = gather_report(model)
        tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    rank = torch.distributed.get_rank()
    attn = model.model.layers[0].self_attn
    q_proj = attn.q_proj.weight
    try:  # a key projection that was not split with the query one
        head_shard(attn.q_proj, torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features), info)
        unsplit_k_proj = "no error"
    except ValueError as e:
        unsplit_k_proj = str(e).split(" ((")[0]
    torch.save(
        {
            "logits": logits.cpu(),
            "local": local,
            "report": report,
            "tokens": tokens.cpu(),
            "q_proj_local_rows": q_proj.to_local().shape[0],
            "tp_size": model.tp_size,
            "unsplit_k_proj": unsplit_k_proj,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
