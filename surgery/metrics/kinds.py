"""What each kind of record holds: the metrics computed for "size", "perplexity", "agreement", "speed",
"generation" and "lm_eval", with their names, units and better-directions (the rows of the comparison table).

Called by `runner.evaluate_source` once it has decided a record must be (re)computed.
"""

from __future__ import annotations

import torch

from surgery.metrics.common import emit
from surgery.metrics.records import Metric

DECODE_PROMPT = 16  # prompt tokens before the timed decode steps (see speed.measure_speed)


def generation_settings(settings) -> dict:
    """The keyed settings of the generation record: the prompts themselves and the new-token count."""
    if not settings.generate:
        return {}
    from surgery.metrics.generation import pick_prompts

    return {"prompts": pick_prompts(settings.generate), "new_tokens": settings.gen_tokens}


def compute_kind(kind, settings, resolved, loaded, blocks, teacher, seq_len, label, progress, cancel, *,
                 prompt_len: int | None = None):
    """Compute the metrics of one kind of record.

    Args:
        kind: "size", "perplexity", "agreement", "speed", "generation" or "lm_eval".
        settings: The EvalSettings.
        resolved: The model's ResolvedSource (size reads only its headers).
        loaded: The LoadedModel (None is fine for "size").
        blocks: TokenBlocks for perplexity / agreement.
        teacher: A runner.Teacher for agreement.
        seq_len: The effective window length.
        label, progress, cancel: Passed to the metric (see surgery.metrics.common).
        prompt_len: The effective prefill prompt length (speed only).

    Returns:
        (the Metric list, unkeyed run details for the record's `run` field).
    """
    if kind == "size":
        from surgery.metrics.size import model_size

        s = model_size(resolved, context=seq_len)
        return [
            Metric(name="params", value=s.params_total, unit="params", better="lower"),
            Metric(name="params (non-embedding)", value=s.params_non_embedding, unit="params", better="lower"),
            Metric(name="bytes on disk", value=s.bytes_on_disk, unit="bytes", better="lower", note=s.format),
            # like with like: the checkpoint the model runs from (a GGUF's dequantized conversion)
            Metric(name="bytes as checkpoint", value=s.bytes_checkpoint, unit="bytes", better="lower",
                   note=s.checkpoint_format),
            Metric(name=f"FLOPs/token @{seq_len}", value=s.flops_per_token, unit="FLOPs", better="lower"),
        ], {}
    if kind == "perplexity":
        from surgery.metrics.perplexity import perplexity

        r = perplexity(loaded.model, blocks, stride=settings.stride, batch_size=settings.batch_size,
                       progress=progress, cancel=cancel, label=label)
        return [
            Metric(name="perplexity", value=r.perplexity, unit="", better="lower"),
            Metric(name="NLL/token", value=r.nll_per_token, unit="nats", better="lower"),
        ], {"batch_size": settings.batch_size, "targets": r.targets, "windows": r.windows}
    if kind == "agreement":
        from surgery.metrics.agreement import agreement

        r = agreement(loaded.model, teacher.model(progress), blocks, top_k=settings.top_k,
                      batch_size=settings.batch_size, progress=progress, cancel=cancel, label=label)
        return [
            Metric(name="KL(teacher||model)", value=r.kl, unit="nats", better="lower"),
            Metric(name="top-1 agreement", value=r.top1, unit="fraction", better="higher"),
            Metric(name=f"top-{r.top_k} overlap", value=r.topk_overlap, unit="fraction", better="higher"),
        ], {"batch_size": settings.batch_size, "positions": r.positions}
    if kind == "speed":
        return _speed(settings, prompt_len, loaded, label, progress, cancel)
    if kind == "generation":
        from surgery.metrics.generation import generate_samples, pick_prompts

        samples = generate_samples(loaded.model, loaded.tokenizer, pick_prompts(settings.generate),
                                   new_tokens=settings.gen_tokens, progress=progress, cancel=cancel, label=label)
        return [Metric(name=f"sample {i + 1}", value=s.completion, unit="text", note=s.prompt)
                for i, s in enumerate(samples)], {}
    if kind == "lm_eval":
        import importlib.metadata

        from surgery.metrics.lm_eval_tasks import run_tasks

        emit(progress, "lm_eval", model=label, message=f"lm-eval {','.join(settings.lm_eval)}")
        scores = run_tasks(loaded.model, loaded.tokenizer, list(settings.lm_eval), batch_size=settings.batch_size,
                           limit=settings.lm_eval_limit)
        return [Metric(name=f"{s.task} {s.metric}", value=s.value, unit="score", better="higher", spread=s.stderr,
                       note="spread is lm-eval's stderr") for s in scores], {
            "lm_eval": importlib.metadata.version("lm_eval")}
    raise ValueError(f"unknown metric kind {kind!r}")


def _speed(settings, prompt_len, loaded, label, progress, cancel):
    from surgery.metrics.speed import measure_speed

    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
    # token ids do not change the time a dense forward takes: fixed random prompts keep speed independent of data
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (max(1, settings.speed_batch), prompt_len), generator=g)
    r = measure_speed(loaded.model, prompts, new_tokens=settings.new_tokens, batch=settings.speed_batch,
                      repeats=settings.repeats, warmup=settings.warmup, decode_prompt_len=DECODE_PROMPT,
                      progress=progress, cancel=cancel, label=label)
    memory_note = {
        "cuda_max_allocated": "torch.cuda.max_memory_allocated during the speed runs",
        "rss_high_water": "peak resident memory of the process during the speed runs (weights included)",
        "process_peak_rss": "peak resident memory of the whole process so far (could not reset the peak)",
    }[r.memory_method]
    return [
        Metric(name=f"prefill {r.prompt_len} tok", value=r.prefill_ms.median, unit="ms", better="lower",
               spread=r.prefill_ms.spread, samples=r.prefill_ms.samples),
        Metric(name="decode b=1", value=r.decode_tps_1.median, unit="tokens/s", better="higher",
               spread=r.decode_tps_1.spread, samples=r.decode_tps_1.samples),
        Metric(name=f"decode b={r.batch}", value=r.decode_tps_b.median, unit="tokens/s", better="higher",
               spread=r.decode_tps_b.spread, samples=r.decode_tps_b.samples),
        Metric(name="peak memory", value=r.peak_memory_mib, unit="MiB", better="lower", note=memory_note),
    ], {"memory_method": r.memory_method}
