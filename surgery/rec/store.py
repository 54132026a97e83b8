"""Rec model directories: save and load SASRec, GRU4Rec and LLM recommenders. No pickles.

    OUT/rec.json            version, kind "rec-model", model spec (kind + constructor arguments), data description
                            (fingerprint included), training record, metrics
    OUT/rec.safetensors     baselines: every tensor; LLM: items.weight, in_proj.*, out_proj.* (not the backbone)
    OUT/config.json, OUT/model.safetensors, tokenizer files, surgery.json
                            LLM only: the backbone as an ordinary HF directory (`surgery.export.save_model_dir`),
                            so `workbench inspect OUT` and every other model command read it unchanged

Writes go to a hidden temporary sibling renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from surgery.errors import UserError
from surgery.export import atomic_dir

REC_VERSION = 1
REC_JSON = "rec.json"
REC_TENSORS = "rec.safetensors"


def is_rec_dir(path: str | Path) -> bool:
    return (Path(path) / REC_JSON).is_file()


def trained_on(doc: dict) -> str | None:
    """The data fingerprint a rec.json records (None when it records none)."""
    return (doc.get("data") or {}).get("fingerprint")


def check_same_data(doc: dict, data, what: str, where: str | Path) -> None:
    """Refuse a model (`what`, its rec.json `doc`) trained on other data than `data` (read from `where`).

    Raises:
        UserError: The fingerprints differ.
    """
    if trained_on(doc) != data.fingerprint:
        raise UserError(f"{what} was trained on other data ({(trained_on(doc) or '?')[:19]}...) than {where} "
                        f"({data.fingerprint[:19]}...)")


def save_rec_model(model, out: str | Path, *, record: dict, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a rec model directory atomically; returns `out`.

    Args:
        model: A `RecModel` (an `LLMRec` gets its backbone saved as an HF directory; merge LoRA first).
        out: Target directory.
        record: Extra JSON-able fields for rec.json (data, train, metrics, backbone).
        tokenizer: Saved with an LLM backbone (so the directory stays a complete HF model).
        overwrite: Replace a non-empty `out`.
    """
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite) as tmp:
        if model.kind == "llm":
            from surgery.export import save_model_dir
            from surgery.pipeline import versions

            manifest = {"version": 1, "kind": "rec-llm", "rec": model.spec(), "versions": versions()}
            save_model_dir(model.lm, tmp, tokenizer=tokenizer, manifest=manifest, overwrite=True)
        tensors = model.head_state_dict() if model.kind == "llm" else model.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp / REC_TENSORS), metadata={"format": "pt"})
        doc = {"version": REC_VERSION, "kind": "rec-model", "model": model.spec(), **record}
        (tmp / REC_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return out


def read_rec_json(path: str | Path) -> dict:
    """rec.json of a rec model directory.

    Raises:
        UserError: Not a rec model directory, or one from a newer workbench.
    """
    path = Path(path).expanduser()
    try:
        doc = json.loads((path / REC_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a rec model (no {REC_JSON}): train one with `workbench rec train`") from None
    except ValueError as exc:
        raise UserError(f"{path / REC_JSON}: malformed JSON ({exc})") from None
    if doc.get("kind") != "rec-model":
        raise UserError(f"{path / REC_JSON} is not a rec model file")
    if doc.get("version", 0) > REC_VERSION:
        raise UserError(f"{path} is rec model version {doc['version']}, newer than this workbench reads")
    return doc


def load_rec_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(model in eval mode, rec.json dict, tokenizer or None) of a rec model directory.

    Raises:
        UserError: Not a rec model directory, or tensors that do not fit the recorded model.
    """
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    doc = read_rec_json(path)
    spec = dict(doc["model"])
    tensors = load_file(str(path / REC_TENSORS))
    tokenizer = None
    if spec["kind"] == "llm":
        from surgery.loading import load_model
        from surgery.rec.llm import LLMRec

        loaded = load_model(str(path), dtype=dtype, device=device)
        spec.pop("kind")
        model = LLMRec(loaded.model, **spec)
        tokenizer = loaded.tokenizer
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("lm.")]
    else:
        from surgery.rec.models import build_baseline

        model = build_baseline(spec)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"{path / REC_TENSORS} does not fit the recorded model (missing {missing[:2]}, unexpected "
                        f"{unexpected[:2]})")
    return model.to(device).eval(), doc, tokenizer
