"""The `workbench` command. Known errors become one line on stderr and exit code 2; bugs exit 1.

Set WORKBENCH_DEBUG=1 to see the traceback of any error.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer import TyperException

from surgery.errors import PlanError, UserError
from workbench.commands import apply as apply_cmd
from workbench.commands import compare as compare_cmd
from workbench.commands import compress as compress_cmd
from workbench.commands import evaluate as evaluate_cmd
from workbench.commands import export as export_cmd
from workbench.commands import inspect as inspect_cmd
from workbench.commands import jobs as jobs_cmd
from workbench.commands import models as models_cmd
from workbench.commands import plan as plan_cmd
from workbench.commands import rec as rec_cmd
from workbench.commands import score as score_cmd
from workbench.commands import sessions as sessions_cmd
from workbench.commands import suggest as suggest_cmd

app = typer.Typer(
    name="workbench",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Model-surgery workbench: inspect, prune, distill and compare Hugging Face causal LMs.",
)
@app.callback()
def root(ctx: typer.Context) -> None:
    """Model-surgery workbench: inspect, prune, distill and compare Hugging Face causal LMs.

    With no command, opens the Textual workbench on the demo model (SmolLM2-135M-Instruct) in its default session.
    """
    if ctx.invoked_subcommand is None:
        # in the demo's default session (like `workbench open smollm2-135m`): nothing acknowledged is lost on `q`
        sessions_cmd.open_session("smollm2-135m")


app.command("inspect")(inspect_cmd.inspect)
app.command("score")(score_cmd.score)
plan_cmd.app.command("suggest")(suggest_cmd.suggest)
app.command("apply")(apply_cmd.apply)
app.command("export")(export_cmd.export)
app.command("eval")(evaluate_cmd.evaluate)
app.command("compare")(compare_cmd.compare)
app.command("distill")(jobs_cmd.distill)
app.command("compress")(compress_cmd.compress)
app.add_typer(jobs_cmd.app, name="jobs")
app.command("open")(sessions_cmd.open_session)
app.add_typer(sessions_cmd.app, name="sessions")
app.add_typer(plan_cmd.app, name="plan")
app.add_typer(models_cmd.app, name="models")
app.add_typer(rec_cmd.app, name="rec")


def _debug() -> bool:
    return os.environ.get("WORKBENCH_DEBUG", "") not in ("", "0")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code (tests call this; `main` exits with it)."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="workbench", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except PlanError as exc:
        if _debug():
            traceback.print_exc()
        # one line per problem: "every problem at once" is the point of validation
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except UserError as exc:
        if _debug():
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except TyperException as exc:
        # typer (0.29+) raises its own vendored click's exceptions, not click's: a usage error shows the usage
        # line and the flag names, exit 2
        if hasattr(exc, "show"):
            exc.show()
        else:
            print(f"error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if _debug():
            traceback.print_exc()
        if exc.filename is None:  # not about a path the user or the environment gave: treat as a bug
            print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        # the environment, not a bug: a full disk, a read-only or unreadable path, a name too long
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        print(f"error: {exc.strerror or type(exc).__name__}: {where}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if _debug():
            traceback.print_exc()
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            print(f"internal error: {type(exc).__name__}: {first} (WORKBENCH_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
        return 1


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
