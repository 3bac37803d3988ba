"""The per-model tables of the planner: what autograd saves for backward per clip, counted once per architecture
(bench/bench_memory_plan.py --count prints them, and without --count checks the planner against measurement), and
the public config `plan` reads without --model-dir. Keyed by ModelSpec.name; a model without a table gets the rough
rule of thumb (dfd_video.planning.memory.plan_memory)."""
from __future__ import annotations

# Wan: what autograd keeps for backward per clip while the network runs with grad, as {shape: (tensors in the
# compute dtype, fp32 tensors)}, S video tokens, T text tokens, D width, F ffn width, H heads, r LoRA rank.
# Counted with saved_tensors_hooks in diffusers 0.42.1's WanTransformerBlock under FSDP2 bf16 on torch 2.13's CPU
# kernels (bench/bench_memory_plan.py prints the check): per block the norms' fp32 inputs and outputs, q / k / v
# before and after RMSNorm and RoPE, SDPA's output and log-sum-exp, the projections' inputs, the FFN's hidden
# state and GELU output; the root: the text embedder, RoPE tables, the head's norm. With LoRA the frozen base
# saves less (no fp32 copies for weight gradients) and each target layer adds its rank-r hidden state.
WAN = {
    "full": {"block": {"S*D": (10, 12), "S*F": (2, 0), "S*H": (0, 2), "S": (0, 9), "T*D": (2, 2), "T": (0, 1),
                       "D": (0, 5)},
             "root": {"latent": (1, 2), "T*text": (1, 0), "T*D": (3, 0), "S*D": (1, 2), "S": (0, 2), "D": (3, 2),
                      "S*head_dim": (2, 0)}},
    "lora": {"block": {"S*D": (9, 6), "S*F": (2, 0), "S*H": (0, 2), "S": (0, 9), "T*D": (2, 1), "T": (0, 1),
                       "D": (0, 5), "S*r": (8, 0), "T*r": (2, 0)},
             "root": {"latent": (0, 2), "T*D": (1, 0), "S*D": (0, 1), "S": (0, 2), "D": (1, 0),
                      "S*head_dim": (2, 0)}}}

# Cosmos: the same, per clip; the keys are dfd_video.planning.memory.shape_elements' (A: adaLN-LoRA width, ctx: the text
# width after the Qwen projection, text: Qwen's concatenated width, patch: the patch embedding's input per token).
# Counted with saved_tensors_hooks in diffusers 0.42.1's CosmosTransformerBlock under FSDP2 bf16 on torch 2.13's
# CPU kernels (bench/bench_memory_plan.py --model cosmos: --count --dtype bf16 prints it, without --count the
# check): per block the three adaLN modulations, per token since the timestep is per latent frame (each an [S, 3D]
# shift / scale / gate, 9 of S x D, and an S x A hidden state), the LayerNorms' inputs and statistics, q / k / v
# before and after RMSNorm (with its fp32 copies and statistics), SDPA's output and log-sum-exp, the FFN's hidden
# state and GELU; the root: the patch embedding's input, the Qwen projection's input and output, the per-frame time
# embedding, the per-token embedded timestep, the RoPE tables, the head's norm. "checkpointed": the [S, 3D] time
# embedding every block reads, which checkpointing keeps (with LoRA the embedded timestep too, which the frozen
# modulation does not save). With LoRA the frozen base saves less and each target layer adds its rank-r hidden
# state.
COSMOS = {
    "full": {"block": {"S*D": (39, 3), "S*F": (2, 0), "S*H": (0, 5), "S": (6, 0), "S*A": (3, 0), "T*D": (4, 1),
                       "T*H": (0, 1)},
             "root": {"latent": (0, 1), "frames": (0, 2), "frames*D": (4, 0), "S*patch": (1, 0), "T*text": (1, 0),
                      "T*ctx": (2, 0), "S*D": (6, 0), "S": (2, 0), "S*A": (1, 0), "S*head_dim": (0, 2)},
             "checkpointed": {"S*D": (3, 0)}},
    "lora": {"block": {"S*D": (27, 3), "S*F": (2, 0), "S*H": (0, 5), "S": (6, 0), "T*D": (3, 1), "T*H": (0, 1),
                       "S*r": (8, 0), "T*r": (2, 0)},
             "root": {"latent": (0, 1), "frames": (0, 2), "T*ctx": (1, 0), "S*D": (2, 0), "S": (2, 0),
                      "S*head_dim": (0, 2)},
             "checkpointed": {"S*D": (4, 0)}}}


def _without_fp32_norm_copies(table: dict) -> dict:
    """Under fp32 compute the RMSNorms' fp32 copies of q / k (3 of S x D and 1 of T x D per block) are the tensors
    themselves: the same table without them (--count --dtype fp32 counts 39 / 4, LoRA 27 / 3)."""
    b = table["block"]
    return {**table, "block": {**b, "S*D": (b["S*D"][0], 0), "T*D": (b["T*D"][0], 0)}}


COSMOS.update({f"{k}_fp32": _without_fp32_norm_copies(COSMOS[k]) for k in ("full", "lora")})

SAVED_FOR_BACKWARD = {"wan": WAN, "cosmos": COSMOS}
# the public transformer configs in dfd_video/configs/ (each with its "_source"), by model and `plan --config` name;
# the first of each model is the default of `plan`
PUBLIC_CONFIGS = {"wan": {"wan2.1-t2v-1.3b": "wan2.1_t2v_1.3b_transformer.json",
                          "wan2.1-t2v-14b": "wan2.1_t2v_14b_transformer.json",
                          "wan2.2-ti2v-5b": "wan2.2_ti2v_5b_transformer.json"},
                  "cosmos": {"cosmos-predict2.5-2b": "cosmos_predict2.5_2b_transformer.json",
                             "cosmos-predict2.5-14b": "cosmos_predict2.5_14b_transformer.json"}}
PUBLIC_CONFIG = {name: next(iter(files.values())) for name, files in PUBLIC_CONFIGS.items()}
