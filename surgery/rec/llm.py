"""The LLM recommender (E4SRec / SLMRec style): item-ID embeddings run through a causal-LM backbone.

    item ids (B, L) -> item table E (N + 1, d) -> in_proj (d -> D) -> backbone blocks (inputs_embeds)
      -> last hidden state (B, L, D) -> out_proj (D -> d) -> dot product with E -> (B, L, N + 1) scores

The backbone is any causal LM the core loads (`surgery.loading.load_model`); its token embeddings and LM head are
not used (they stay in the checkpoint so the backbone directory remains an ordinary HF model: inspectable,
scorable, prunable). Training is next-item cross-entropy over all items at every position; the backbone is fully
fine-tuned or adapted with LoRA (peft), merged back before saving.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from surgery.errors import UserError
from surgery.rec.models import RecModel


def unwrap(lm: nn.Module) -> nn.Module:
    """The *ForCausalLM inside a peft wrapper (LoRA layers stay injected in it), or `lm` itself."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder-block ModuleList of a causal LM (from its family's table in `surgery.arch`)."""
    from surgery.arch import spec_for_config
    from surgery.ops import get_module

    lm = unwrap(lm)
    return get_module(lm, spec_for_config(lm.config).layers)


class LLMRec(RecModel):
    """Item embeddings + projections around a causal-LM backbone (see the module docstring).

    Args:
        lm: A *ForCausalLM model (its base model runs on `inputs_embeds`).
        num_items: Items are 1..num_items (0 = padding).
        item_dim: Width d of the item table.
        max_len: History cap (recorded; the backbone's positions must cover it).
    """

    kind = "llm"

    def __init__(self, lm: nn.Module, num_items: int, item_dim: int = 64, max_len: int = 50):
        super().__init__()
        width = lm.config.get_text_config().hidden_size
        self.args = dict(num_items=num_items, item_dim=item_dim, max_len=max_len)
        self.lm = lm
        self.items = nn.Embedding(num_items + 1, item_dim, padding_idx=0)
        self.in_proj = nn.Linear(item_dim, width)
        self.out_proj = nn.Linear(width, item_dim)
        nn.init.normal_(self.items.weight, std=0.02)
        self.lm.config.use_cache = False

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.lm))

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids -> (B, L, d) states in item space."""
        dtype = next(self.lm.parameters()).dtype
        x = self.in_proj(self.items(inputs)).to(dtype)  # (B, L, D)
        # right padding: real positions never attend to padding, so no attention mask is needed
        out = unwrap(self.lm).base_model(inputs_embeds=x, use_cache=False)
        return self.out_proj(out.last_hidden_state.to(self.out_proj.weight.dtype))  # (B, L, d)

    def item_embeddings(self) -> torch.Tensor:
        return self.items.weight

    def spec(self) -> dict:
        return {"kind": self.kind, **self.args}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are not the backbone: items.weight, in_proj.*, out_proj.*."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}


def item_table(source: str | Path, data, item_dim: int) -> tuple[torch.Tensor, dict]:
    """The item table (`items.weight`, (N + 1, d)) of a trained rec model directory, checked against `data`.

    E4SRec / LLaRA start the LLM recommender from item-ID embeddings a conventional sequential recommender
    learned: every rec model here (SASRec, GRU4Rec, a DLLM2Rec student, an LLM recommender) stores its table
    as `items.weight`, so any of them can be the source.

    Args:
        source: A rec model directory (`surgery.rec.store`).
        data: The `RecData` the new model trains on (the source must have been trained on the same data).
        item_dim: The width d of the new model's item table.

    Returns:
        (the (N + 1, d) float32 table, a provenance record for rec.json).

    Raises:
        UserError: Not a rec model, other data, or another width.
    """
    from safetensors import safe_open

    from surgery.rec.store import REC_TENSORS, check_same_data, read_rec_json

    path = Path(source).expanduser()
    doc = read_rec_json(path)
    check_same_data(doc, data, f"the --item-init model {path}", "--data")
    with safe_open(str(path / REC_TENSORS), framework="pt") as f:
        if "items.weight" not in f.keys():
            raise UserError(f"{path / REC_TENSORS} has no items.weight: --item-init needs a rec model directory")
        table = f.get_tensor("items.weight").float()  # (N + 1, d)
    if table.shape != (data.num_items + 1, item_dim):
        raise UserError(f"--item-init {path} has {table.shape[1]}-d item embeddings for {table.shape[0] - 1} items; "
                        f"this model needs {item_dim}-d for {data.num_items} (pass --item-dim {table.shape[1]})")
    import hashlib

    digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()
    return table, {"path": str(path), "kind": doc["model"]["kind"], "job": doc.get("job"), "sha256": digest}


def add_lora(model: LLMRec, rank: int = 8, alpha: int = 16, dropout: float = 0.0) -> LLMRec:
    """Wrap the backbone's attention and MLP Linears with LoRA adapters (peft) and freeze the rest of it.

    The item table and the projections stay fully trainable. `merge_lora` folds the adapters back before saving.

    Raises:
        UserError: peft is not installed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("LoRA needs peft: `pip install peft`, or train with --full") from None
    from surgery.arch import spec_for_config

    spec = spec_for_config(model.lm.config)
    targets = sorted({n.rsplit(".", 1)[-1] for n in (*spec.attn_linears, *spec.mlp_linears)})
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    model.lm = get_peft_model(model.lm, config)
    return model


def merge_lora(model: LLMRec) -> LLMRec:
    """Fold LoRA adapters into the backbone weights (no-op without LoRA)."""
    if hasattr(model.lm, "merge_and_unload"):
        model.lm = model.lm.merge_and_unload()
    return model


def pick_layers(n_teacher: int, n_student: int, how: str = "first") -> list[int]:
    """Teacher blocks a student keeps: the first k, or every m-th (spread evenly, the last block included).

    Raises:
        UserError: A student deeper than the teacher, or an unknown rule.
    """
    if not 1 <= n_student <= n_teacher:
        raise UserError(f"--student-layers must be between 1 and the teacher's {n_teacher} layers (got {n_student})")
    if how == "first":
        return list(range(n_student))
    if how == "spaced":
        return [(j + 1) * n_teacher // n_student - 1 for j in range(n_student)]
    raise UserError(f"unknown layer rule {how!r}: use 'first' or 'spaced'")


def shallow_copy(teacher: LLMRec, keep: list[int]) -> LLMRec:
    """A student that keeps teacher blocks `keep` (renumbered 0..k-1) and copies every other tensor.

    The cut is a `drop_layers` plan applied with `surgery.apply`, so the config is rewritten the same way as
    `workbench apply` does it and the student's backbone saves as an ordinary HF model.
    """
    from surgery.apply import apply_plan
    from surgery.plan import parse_plan

    student = copy.deepcopy(teacher)
    drop = [i for i in range(teacher.num_layers) if i not in set(keep)]
    if drop:
        apply_plan(student.lm, parse_plan({"version": 1, "steps": [{"op": "drop_layers", "layers": drop}]}))
    student.lm.config.use_cache = False
    return student
