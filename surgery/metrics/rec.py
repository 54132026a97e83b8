"""Recommendation metrics as eval records: HR/NDCG/MRR of a rec model directory beside its size and speed rows.

A rec model directory (`surgery.rec.store`) is either an LLM recommender (also an ordinary HF directory, so every
language-model metric applies to its backbone) or a baseline (SASRec, GRU4Rec: no config.json, not a language
model, so only its size and the "rec" record apply; the other rows stay blank).

The "rec" record is what `workbench rec eval --json` reports, made by the same call (`surgery.rec.metrics.evaluate`
through `evaluate_rec_model`): for each protocol ("full", "sampled-999") HR@1/5/10, NDCG@5/10 and MRR of the
held-out test item, the recommender's parameters (item tensors included) and the inference seconds per 1k users.
Its `data` is a `RecDataRef` carrying the prepared data's fingerprint; a model trained on other data than
`--rec-data` is refused (its item ids would not line up).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import UserError
from surgery.metrics.common import ProgressFn, check_cancel, emit
from surgery.metrics.records import Metric, RecDataRef

REC_PROTOCOLS = ("full", "sampled-999")
REC_METRICS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
REC_BATCH = 64  # users per scoring call, as `workbench rec eval` (only the timing depends on it)


def is_rec_model(source: str) -> bool:
    """A rec model directory (LLM recommender or baseline)."""
    from surgery.rec.store import is_rec_dir

    return Path(source).expanduser().is_dir() and is_rec_dir(Path(source).expanduser())


def is_rec_baseline(source: str) -> bool:
    """A rec model directory that is not a language model (SASRec, GRU4Rec: no config.json)."""
    return is_rec_model(source) and not (Path(source).expanduser() / "config.json").is_file()


def check_rec_source(source: str, data) -> None:
    """Refuse a rec model trained on other data than `data` (its item ids would mean other items).

    A model whose rec.json records no data cannot be checked and is accepted.

    Args:
        source: A rec model directory.
        data: The `surgery.rec.data.RecData` of --rec-data.

    Raises:
        UserError: One line naming both data fingerprints.
    """
    from surgery.rec.store import check_same_data, read_rec_json, trained_on

    doc = read_rec_json(Path(source).expanduser())
    if trained_on(doc) is not None:
        check_same_data(doc, data, source, "--rec-data")


def checked_rec_data(source: str, settings):
    """The RecData of `settings.rec_data`, after checking that the rec model `source` was trained on it.

    Raises:
        UserError: Not a prepared directory, or a model trained on other data (`check_rec_source`).
    """
    from surgery.rec.data import load_rec_data

    data = load_rec_data(settings.rec_data)
    check_rec_source(source, data)
    return data


def rec_data_ref(data, path: str) -> RecDataRef:
    """The record's description of the prepared data (fingerprint included)."""
    return RecDataRef(source=str(path), fingerprint=data.fingerprint, users=data.num_users, items=data.num_items,
                      interactions=data.num_interactions)


def rec_settings(settings) -> dict:
    """The keyed settings of a rec record."""
    return {"protocols": list(REC_PROTOCOLS), "seed": 0, "split": "test", "users": settings.rec_max_users}


@dataclass(frozen=True)
class RecEvalResult:
    """One rec model's evaluation.

    Attributes:
        metrics: protocol -> `surgery.rec.metrics.evaluate`'s dict (hr@k, ndcg@k, mrr, users, data_fingerprint...).
        seconds: wall time of the scoring (model loading excluded).
        seconds_per_1k_users: seconds * 1000 / users.
    """

    metrics: dict
    seconds: float
    seconds_per_1k_users: float


def evaluate_rec_model(net, data, *, protocols=REC_PROTOCOLS, split: str = "test", users: list[int] | None = None,
                       seed: int = 0, batch_size: int = REC_BATCH, device: str = "cpu",
                       progress=None, cancel: threading.Event | None = None) -> RecEvalResult:
    """Score a loaded rec model's held-out items under `protocols`, timed.

    Args:
        net: A `RecModel` in eval mode (`surgery.rec.store.load_rec_model`).
        data: The `RecData`.
        protocols, split, users, seed, batch_size, progress, cancel: As `surgery.rec.metrics.evaluate`.
        device: Where `net` lives (histories are moved there).

    Returns:
        A RecEvalResult.
    """
    from surgery.rec.metrics import evaluate

    t0 = time.perf_counter()
    metrics = evaluate(lambda h, n: net.score(h.to(device), n), data, split=split, protocols=tuple(protocols),
                       seed=seed, batch_size=batch_size, users=users, progress=progress, cancel=cancel)
    seconds = time.perf_counter() - t0
    n_users = next(iter(metrics.values()))["users"]
    return RecEvalResult(metrics, seconds, round(seconds * 1000 / n_users, 3))


def rec_metrics(source: str, data, settings, dtype: str, label: str, progress: ProgressFn = None,
                cancel: threading.Event | None = None) -> tuple[list[Metric], dict]:
    """Compute the "rec" record's metrics of one rec model directory.

    Returns:
        (the Metric list, unkeyed run details).
    """
    from surgery.estimate import count_params
    from surgery.rec.store import load_rec_model

    check_cancel(cancel)
    emit(progress, "loading", model=label, message="loading the recommender")
    net, _, _ = load_rec_model(source, device=settings.device, dtype=dtype)
    users = None if settings.rec_max_users is None else list(range(min(settings.rec_max_users, data.num_users)))

    def on_users(done: int, total: int) -> None:
        emit(progress, "rec", done, total, model=label, message="scoring users")

    result = evaluate_rec_model(net, data, users=users, device=settings.device, progress=on_users, cancel=cancel)
    metrics = [Metric(name=f"rec {p} {k}", value=m[k], unit="score", better="higher")
               for p, m in result.metrics.items() for k in REC_METRICS]
    metrics += [
        Metric(name="rec params", value=count_params(net), unit="params", better="lower",
               note="the whole recommender: backbone and item tensors"),
        Metric(name="rec s/1k users", value=result.seconds_per_1k_users, unit="s", better="lower",
               note=f"scoring {REC_BATCH} users per call, loading excluded"),
    ]
    return metrics, {"users": next(iter(result.metrics.values()))["users"], "batch_size": REC_BATCH}


def baseline_size(source: str) -> list[Metric]:
    """Size rows of a baseline rec model from its safetensors header: params, non-embedding params, bytes."""
    from surgery.inspect import read_safetensors_header
    from surgery.rec.store import REC_TENSORS

    path = Path(source).expanduser() / REC_TENSORS
    tensors = read_safetensors_header(path)
    total = sum(t.numel for t in tensors.values())
    embedding = tensors["items.weight"].numel if "items.weight" in tensors else 0
    return [
        Metric(name="params", value=total, unit="params", better="lower"),
        Metric(name="params (non-embedding)", value=total - embedding, unit="params", better="lower"),
        Metric(name="bytes on disk", value=path.stat().st_size, unit="bytes", better="lower"),
    ]



def evaluate_baseline(source: str, settings, wanted: list[str], rec_data, store, fresh: bool,
                      progress: ProgressFn = None, cancel: threading.Event | None = None):
    """`runner.evaluate_source` for a SASRec / GRU4Rec directory: size from its tensor header and the rec record.

    Args:
        source: The baseline's directory.
        settings: The EvalSettings.
        wanted: Kinds to produce ("size", "rec").
        rec_data: The checked RecData (None without --rec-data).
        store, fresh, progress, cancel: As `evaluate_source`.

    Returns:
        A `runner.ModelEval` (no language-model kinds: those rows stay blank in a comparison).
    """
    from surgery.fingerprint import weights_fingerprint
    from surgery.metrics.common import device_name
    from surgery.metrics.records import ModelRef
    from surgery.metrics.runner import ModelEval, add_record

    emit(progress, "fingerprint", model=source, message="fingerprinting weights")
    result = ModelEval(source, ModelRef(source=source, fingerprint=weights_fingerprint(Path(source))))
    specs = {"size": dict(settings={}),
             "rec": dict(device=settings.device, hardware=device_name(settings.device),
                         dtype="float32", data=rec_data_ref(rec_data, settings.rec_data) if rec_data else None,
                         settings=rec_settings(settings))}

    def compute(kind: str):
        if kind == "size":
            return baseline_size(source), {}
        return rec_metrics(source, rec_data, settings, "float32", source, progress, cancel)

    for kind in wanted:
        add_record(kind, specs[kind], result, store, fresh, cancel, compute)
    return result
