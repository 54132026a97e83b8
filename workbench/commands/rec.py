"""`workbench rec ...`: sequential-recommendation data, training (as jobs), SLMRec and DLLM2Rec distillation,
evaluation."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_common import JsonOpt, err, out, print_json, status

app = typer.Typer(no_args_is_help=True,
                  help="Recommendation tasks: prepare, train, distill, distill-to, eval.")

DataOpt = Annotated[Path, typer.Option("--data", help="Prepared data directory (`workbench rec prepare`).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Output directory.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")]
EpochsOpt = Annotated[int | None, typer.Option(
    "--epochs", help="Passes over the training users (default 30 for SASRec/GRU4Rec students, 1 for LLM jobs).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Users per step.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="AdamW learning rate (default 1e-3; 1e-4 for LLMs).")]
UsersOpt = Annotated[int | None, typer.Option("--max-users", help="Train on this many users (a seeded choice; "
                                                                  "default: all).")]
EvalUsersOpt = Annotated[int | None, typer.Option("--eval-users", help="End-of-job validation: the first N "
                                                                      "users (default: all).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for init, batch order and negatives.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
JobsDirOpt = Annotated[Path | None, typer.Option("--jobs-dir", help="Jobs root (default $WORKBENCH_JOBS or user data).")]
DetachOpt = Annotated[bool, typer.Option("--detach", help="Run as a background job and return at once.")]
DimOpt = Annotated[int, typer.Option("--dim", help="Baselines: embedding width.")]
LayersOpt = Annotated[int, typer.Option("--layers", help="Baselines: blocks / GRU layers.")]


@app.command("prepare")
def prepare_cmd(
    source: Annotated[Path, typer.Argument(help="MovieLens-format directory (ratings.csv) or a ratings CSV.")],
    out_dir: OutOpt,
    min_rating: Annotated[float, typer.Option("--min-rating", help="Ratings strictly above this are positive.")] = 3.0,
    core: Annotated[int, typer.Option("--core", help="Iterative k-core filter on users and items.")] = 5,
    max_len: Annotated[int, typer.Option("--max-len", help="History cap per user.")] = 50,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Positive ratings -> k-core -> time order -> leave-one-out split, saved with a fingerprint."""
    from surgery.export import check_output_dir
    from surgery.rec.data import prepare, save_rec_data

    check_output_dir(out_dir, overwrite)
    with status(not json_out) as say:
        data = prepare(source, min_rating=min_rating, core=core, max_len=max_len, progress=say)
        save_rec_data(data, out_dir, overwrite=overwrite)
    info = {**data.describe(), "out": str(out_dir)}
    if json_out:
        print_json(info)
        return
    out.print(f"{data.num_users:,} users, {data.num_items:,} items, {data.num_interactions:,} interactions -> "
              f"{out_dir}\nfingerprint {data.fingerprint}")


def _job_options(batch_size: int):
    """Give a job command the options every rec job shares, after its own (the order `--help` shows).

    The command receives them as one dict, `job`: out, overwrite, epochs, batch_size, lr, max_users, eval_users,
    seed, device (job-file fields) and jobs_dir, detach, json_out (how to run it). typer reads the rewritten signature.
    """
    K = inspect.Parameter.KEYWORD_ONLY
    shared = [inspect.Parameter("epochs", K, default=None, annotation=EpochsOpt),
              inspect.Parameter("batch_size", K, default=batch_size, annotation=BatchOpt),
              inspect.Parameter("lr", K, default=None, annotation=LrOpt),
              inspect.Parameter("max_users", K, default=None, annotation=UsersOpt),
              inspect.Parameter("eval_users", K, default=None, annotation=EvalUsersOpt),
              inspect.Parameter("seed", K, default=0, annotation=SeedOpt),
              inspect.Parameter("device", K, default="cpu", annotation=DeviceOpt),
              inspect.Parameter("jobs_dir", K, default=None, annotation=JobsDirOpt),
              inspect.Parameter("detach", K, default=False, annotation=DetachOpt),
              inspect.Parameter("overwrite", K, default=False, annotation=OverwriteOpt),
              inspect.Parameter("json_out", K, default=False, annotation=JsonOpt)]
    names = [p.name for p in shared]

    def wrap(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "job"]

        @functools.wraps(fn)
        def command(**kwargs):
            return fn(**{k: v for k, v in kwargs.items() if k not in names},
                      job={k: kwargs[k] for k in names})

        params = own + shared
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


# Defaults per kind of model: a small SASRec/GRU4Rec needs tens of cheap epochs (2-4 s each on a CPU; one epoch
# leaves it near chance), an LLM recommender one expensive epoch and a lower rate.
BASELINE_EPOCHS, LLM_EPOCHS = 30, 1


def _job_fields(job: dict, out_dir: Path, default_lr: float, default_epochs: int) -> dict:
    """The job-file fields of the shared options (paths made absolute)."""
    return {"out": _abs(out_dir), "overwrite": job["overwrite"],
            "epochs": default_epochs if job["epochs"] is None else job["epochs"], "batch_size": job["batch_size"],
            "lr": default_lr if job["lr"] is None else job["lr"], "max_users": job["max_users"],
            "eval_users": job["eval_users"], "seed": job["seed"], "device": job["device"]}


def _run(cfg, job: dict, check=None) -> None:
    """Create the job (after `check(data)`, which raises on bad input) and launch it."""
    from surgery.export import check_output_dir
    from surgery.rec.data import load_rec_data
    from surgery.rec.train import create_rec_job

    check_output_dir(Path(cfg.out), cfg.overwrite)
    data = load_rec_data(cfg.data)
    if check is not None:
        check(data)
    _launch(create_rec_job(cfg, data.num_users, job["jobs_dir"]), job["json_out"], job["detach"], resumed=False)


def _launch(job, json_out: bool, detach: bool, *, resumed: bool) -> None:
    """Run a created or stopped rec job: detached (report the pid) or in the foreground (report the result)."""
    from surgery.rec.train import run_rec_job, start_rec_job

    if detach:
        pid = start_rec_job(job)
        if resumed:
            out.print(f"job {job.id} resumed (pid {pid})")
        elif json_out:
            print_json({"job": job.id, "path": str(job.path), "pid": pid})
        else:
            out.print(f"job {job.id} started (pid {pid}); follow it with `workbench jobs show {job.id}`")
        return
    if not resumed:
        err.print(f"job {job.id} (foreground; Ctrl-C stops it, `workbench rec resume {job.id}` continues it)")
    with status(not json_out) as say:
        final = run_rec_job(job.path, progress=say)
    _report(final, job, json_out)


def _report(final: dict, job, json_out: bool) -> None:
    if json_out:
        print_json({"job": job.id, **{k: v for k, v in final.items() if k != "time"}})
        return
    if final["event"] == "cancelled":
        out.print(f"cancelled at step {final['step']}: `workbench rec resume {job.id}` continues it")
        return
    ev = final.get("eval") or {}
    out.print(f"done: {final['output']}  (valid, full ranking: HR@10 {ev.get('hr@10', float('nan')):.4f}, "
              f"NDCG@10 {ev.get('ndcg@10', float('nan')):.4f}, MRR {ev.get('mrr', float('nan')):.4f})")


def _abs(p: Path | str) -> str:
    """An absolute path, so the job file stands alone (a resume may run from another directory)."""
    return str(Path(p).expanduser().resolve())


@app.command("train")
@_job_options(batch_size=64)
def train_cmd(
    model: Annotated[str, typer.Argument(help="sasrec, gru4rec or llm.")],
    data: DataOpt,
    out_dir: OutOpt,
    backbone: Annotated[str | None, typer.Option("--backbone", help="LLM: causal-LM source (dir, hub id, .gguf, "
                                                                   "smollm2-135m).")] = None,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LLM: LoRA adapters (peft) or full fine-tuning.")] = False,
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LLM with --lora: rank r of each adapter pair.")] = 8,
    item_dim: Annotated[int, typer.Option("--item-dim", help="LLM: item embedding width.")] = 64,
    item_init: Annotated[Path | None, typer.Option("--item-init", help="LLM: copy the item table of this trained rec "
                                                                       "model (SASRec, GRU4Rec...; E4SRec).")] = None,
    freeze_items: Annotated[bool, typer.Option("--freeze-items", help="LLM: keep the --item-init table "
                                                                      "fixed.")] = False,
    dim: DimOpt = 64,
    layers: LayersOpt = 2,
    *,
    job: dict,
) -> None:
    """Train SASRec, GRU4Rec or the LLM recommender (next item at every position) as a job."""
    from surgery.errors import UserError
    from surgery.rec.train import parse_job

    if model not in ("sasrec", "gru4rec", "llm"):
        raise UserError(f"unknown model {model!r}: use sasrec, gru4rec or llm")
    if model == "llm" and not backbone:
        raise UserError("`rec train llm` needs --backbone SOURCE (e.g. smollm2-135m)")
    if (item_init or freeze_items) and model != "llm":
        raise UserError("--item-init and --freeze-items are for `rec train llm`")
    if freeze_items and not item_init:
        raise UserError("--freeze-items needs --item-init MODEL (a random table kept fixed learns nothing)")
    backbone_ref = None if backbone is None else (_abs(backbone) if Path(backbone).expanduser().exists() else backbone)
    defaults = (1e-4, LLM_EPOCHS) if model == "llm" else (1e-3, BASELINE_EPOCHS)
    cfg = parse_job({"model": model, "data": _abs(data), **_job_fields(job, out_dir, *defaults),
                     "backbone": backbone_ref, "lora": lora, "lora_rank": lora_rank, "item_dim": item_dim, "dim": dim,
                     "layers": layers, "item_init": None if item_init is None else _abs(item_init),
                     "freeze_items": freeze_items})

    def check(rec_data) -> None:  # fail before a job is created
        if item_init is not None:
            from surgery.rec.llm import item_table

            item_table(item_init, rec_data, item_dim)
    _run(cfg, job, check)


@app.command("distill")
@_job_options(batch_size=16)
def distill_cmd(
    teacher: Annotated[Path, typer.Option("--teacher", help="Trained LLM recommender directory.")],
    student_layers: Annotated[int, typer.Option("--student-layers", help="Blocks the student keeps.")],
    data: DataOpt,
    out_dir: OutOpt,
    loss: Annotated[str, typer.Option("--loss", help="Weighted terms: ce, hidden-cos, hidden-l2, block-ce.")] = (
        "ce:1,hidden-cos:1,hidden-l2:0.1,block-ce:0.1"),
    layer_pick: Annotated[str, typer.Option("--layer-pick", help="first (first k blocks) or spaced (every m-th).")] = (
        "first"),
    blocks: Annotated[int | None, typer.Option("--blocks", help="Boundaries matched (default: every student "
                                                               "block).")] = None,
    *,
    job: dict,
) -> None:
    """SLMRec: train a shallow copy of an LLM recommender on its block-boundary hidden states (a job)."""
    from surgery.rec.distill import parse_losses
    from surgery.rec.train import parse_job

    cfg = parse_job({"model": "distill", "teacher": _abs(teacher), "student_layers": student_layers,
                     "losses": parse_losses(loss), "layer_pick": layer_pick, "blocks": blocks, "data": _abs(data),
                     **_job_fields(job, out_dir, 1e-4, LLM_EPOCHS)})
    _run(cfg, job)


@app.command("distill-to")
@_job_options(batch_size=64)
def distill_to_cmd(
    student: Annotated[str, typer.Argument(help="sasrec or gru4rec.")],
    teacher: Annotated[Path, typer.Option("--teacher", help="Trained LLM recommender directory.")],
    data: DataOpt,
    out_dir: OutOpt,
    top_k: Annotated[int, typer.Option("--top-k", help="Teacher candidates per training prefix.")] = 10,
    weights: Annotated[str, typer.Option("--weights", help="Importance weights of the ranking distillation: "
                                                           "position, confidence, consistency.")] = (
        "position:0.3,confidence:0.5,consistency:0.1"),
    lam: Annotated[float, typer.Option("--lambda", help="Weight of the ranking distillation loss (0: off).")] = 0.8,
    embed_distill: Annotated[float, typer.Option("--embed-distill", help="w in e + w * P(e_teacher) (0: "
                                                                         "off).")] = 0.2,
    position_beta: Annotated[float, typer.Option("--position-beta", help="Temperature of the position "
                                                                         "weights.")] = 1.0,
    confidence_beta: Annotated[float, typer.Option("--confidence-beta", help="Temperature of the confidence "
                                                                             "weights.")] = 1.0,
    teacher_cache: Annotated[Path | None, typer.Option("--teacher-cache", help="Teacher rankings file (default: "
                                                                               "the workbench cache).")] = None,
    dim: DimOpt = 64,
    layers: LayersOpt = 2,
    *,
    job: dict,
) -> None:
    """DLLM2Rec: train SASRec or GRU4Rec with an LLM recommender's rankings and item embeddings (a job)."""
    from surgery.errors import UserError
    from surgery.rec.dllm2rec import parse_rank_weights
    from surgery.rec.store import check_same_data, read_rec_json
    from surgery.rec.teacher_cache import check_top_k
    from surgery.rec.train import parse_job

    if student not in ("sasrec", "gru4rec"):
        raise UserError(f"unknown student {student!r}: use sasrec or gru4rec")
    doc = read_rec_json(teacher)

    def check(rec_data) -> None:  # fail before a job is created
        check_top_k(top_k, rec_data)
        check_same_data(doc, rec_data, f"the teacher {teacher}", data)
    cfg = parse_job({"model": "dllm2rec", "student": student, "teacher": _abs(teacher), "top_k": top_k,
                     "rank_weights": parse_rank_weights(weights), "rank_lambda": lam, "embed_distill": embed_distill,
                     "position_beta": position_beta, "confidence_beta": confidence_beta,
                     "teacher_cache": None if teacher_cache is None else _abs(teacher_cache), "dim": dim,
                     "layers": layers, "data": _abs(data), **_job_fields(job, out_dir, 1e-3, BASELINE_EPOCHS)})
    _run(cfg, job, check)


@app.command("resume")
def resume_cmd(
    job_id: Annotated[str, typer.Argument(help="Job id (or a unique prefix, or its directory).")],
    jobs_dir: JobsDirOpt = None,
    detach: DetachOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Continue a cancelled or interrupted rec job from its last checkpoint."""
    from surgery.jobs.runner import check_runnable
    from surgery.jobs.store import find_job, jobs_root

    job = find_job(jobs_root(jobs_dir), job_id)
    check_runnable(job)  # a done job would train again and replace its output; a running one is refused too
    _launch(job, json_out, detach, resumed=True)


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A rec model directory (`rec train` / `rec distill` output).")],
    data: DataOpt,
    protocol: Annotated[list[str] | None, typer.Option("--protocol", help="full (all items) or sampled-N (N "
                                                                           "negatives, e.g. sampled-999); repeatable "
                                                                           "(default: full).")] = None,
    split: Annotated[str, typer.Option("--split", help="test or valid.")] = "test",
    max_users: Annotated[int | None, typer.Option("--max-users", help="Score only the first N users "
                                                                        "(default: all).")] = None,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """HR@1/5/10, NDCG@5/10 and MRR of the held-out items."""
    from surgery.metrics.rec import evaluate_rec_model
    from surgery.rec.data import load_rec_data
    from surgery.rec.metrics import parse_protocol
    from surgery.rec.store import load_rec_model, trained_on

    protocols = tuple(protocol or ["full"])
    for p in protocols:
        parse_protocol(p)
    rec_data = load_rec_data(data)
    users = None if max_users is None else list(range(min(max_users, rec_data.num_users)))
    with status(not json_out) as say:
        say("loading the model")
        net, doc, _ = load_rec_model(model, device=device)
        if trained_on(doc) not in (None, rec_data.fingerprint):
            err.print(f"warning: {model} was trained on other data ({doc['data'].get('path', '?')})")
        result = evaluate_rec_model(net, rec_data, protocols=protocols, split=split, users=users, seed=seed,
                                    batch_size=batch_size, device=device,
                                    progress=lambda d, t: say(f"scored {d}/{t} users"))
    results = result.metrics
    record = {"model": str(model), "kind": doc["model"]["kind"], "params": doc.get("params"),
              "seconds_per_1k_users": result.seconds_per_1k_users, "metrics": results}
    if json_out:
        print_json(record)
        return
    from rich.table import Table

    table = Table("protocol", "HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR", "users")
    for p, m in results.items():
        table.add_row(p, *(f"{m[k]:.4f}" for k in ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")),
                      str(m["users"]))
    out.print(table)
