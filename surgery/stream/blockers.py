"""Why a plan (or its source) cannot stream: one line per reason, torch-free (the dry run asks it too)."""

from __future__ import annotations

from surgery.plan import Plan

STRUCTURAL_OPS = frozenset(
    {"prune_heads", "prune_kv_groups", "prune_neurons", "drop_layers", "drop_attention", "drop_mlp", "low_rank"}
)
# fitted on calibration text layer by layer before the shards stream (surgery.stream.datasteps); low_rank steps
# of every method stream too (svd factorised by the writer, whitened / asvd by that fit)
LAYERWISE_DATA_OPS = frozenset({"reconstruct"})


def plan_blockers(plan: Plan, *, pickle_weights: bool = False, trust_remote_code: bool = False) -> list[str]:
    """Why `plan` cannot stream from this source, one line each (empty: it can)."""
    reasons = []
    for i, step in enumerate(plan.steps):
        if step.op == "prune_experts":
            reasons.append(f"steps[{i}] (prune_experts): checkpoints store experts one by one and the model fuses "
                           "them, a mapping the streaming applier does not do yet, so it runs in memory")
        elif step.op == "prune_hidden":
            reasons.append(f"steps[{i}] (prune_hidden): slices every tensor of the model, which the streaming "
                           "applier does not do yet, so it runs in memory")
        elif step.op not in STRUCTURAL_OPS | LAYERWISE_DATA_OPS:
            reasons.append(f"steps[{i}] ({step.op}): needs the activations of calibration text, so the model must run")
    if pickle_weights:
        reasons.append("the input weights are pickles, not safetensors: they cannot be read slice by slice")
    if trust_remote_code:
        reasons.append("the model runs its own code (--trust-remote-code), which save_pretrained copies with it")
    return reasons
