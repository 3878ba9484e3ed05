"""Diagnostic: training pass vs reference in fp32 on a random-init Gemma-3-270M-shaped model (no weights needed),
with TF32 matmuls off ("highest") and on ("high"). Run on a GPU: PYTHONPATH=src python3 experiments/diag_fp32_gpu.py"""

import time

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from cacheaug import CacheAugmentedLM, CoprocessorConfig
from cacheaug.testing import trace_errors

print(
    "tf32 matmul",
    torch.backends.cuda.matmul.allow_tf32,
    getattr(torch.backends.cuda.matmul, "fp32_precision", None),
    "cudnn",
    torch.backends.cudnn.allow_tf32,
    torch.get_float32_matmul_precision(),
)
lt = (["sliding_attention"] * 5 + ["full_attention"]) * 3
cfg = Gemma3TextConfig(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    sliding_window=512,
    layer_types=lt,
    query_pre_attn_scalar=256,
    max_position_embeddings=32768,
)
torch.manual_seed(0)
base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).cuda().eval()
T = 1024
ids = torch.randint(3, 262144, (2, T), device="cuda")
pos = torch.stack([torch.linspace(0, T - 17, 8), torch.linspace(5, T - 40, 8)]).long().cuda()
for prec in ["highest", "high"]:
    torch.set_float32_matmul_precision(prec)
    model = CacheAugmentedLM(base, CoprocessorConfig(n_latents=16, n_ahead=16, n_traces=8))
    t = time.time()
    err, out = trace_errors(model, ids, pos)
    print(
        prec,
        "max",
        err.max().item(),
        "mean",
        err.mean().item(),
        "loss",
        out.token_losses.mean().item(),
        round(time.time() - t, 1),
        flush=True,
    )
