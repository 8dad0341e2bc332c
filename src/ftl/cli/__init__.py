"""The ftl command line: parse options, call the library, print a result. Nothing else lives here.

One module per command group (as Olive's CLI has), all registered on one click group. Errors are
turned into one line here, and only here: ``error: <what> (<where>) — <fix>``. Anything
unexpected becomes one line too, with ``--debug`` for the traceback. Third-party warnings and log
records go to the log file (:func:`log_path`), not the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
from pydantic import ValidationError
from rich.markup import escape

from ftl.cli.azure import azure, deploy_command, register_command
from ftl.cli.distill import distill
from ftl.cli.eval import eval_command
from ftl.cli.export import export_gguf, export_onnx
from ftl.cli.finetune import finetune
from ftl.cli.generate import chat, generate
from ftl.cli.jobs import jobs
from ftl.cli.models import models
from ftl.cli.pipeline import run_pipeline
from ftl.cli.runs import runs
from ftl.cli.serve import serve
from ftl.cli.sweep import sweep_command
from ftl.config import settings_error
from ftl.errors import FtlError
from ftl.progress import console

_DEBUG = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and third-party warnings instead of one-line errors.")
@click.version_option(package_name="ftl")
def cli(debug: bool) -> None:
    """ftl: distil → fine-tune (Olive: LoRA or qscale) → int4 ONNX → fast CPU inference (onnxruntime-genai).

    Third-party warnings go to the log file ($FTL_LOG, default ~/.cache/ftl/ftl.log).
    """
    _DEBUG["on"] = debug
    _route_logs(debug)


for command in (models, distill, finetune, export_onnx, export_gguf, generate, chat, serve, eval_command, run_pipeline, sweep_command,
                runs, azure, jobs, register_command, deploy_command):
    cli.add_command(command)


def log_path() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ftl" / "ftl.log"
    return Path(os.environ.get("FTL_LOG", default))


def _route_logs(debug: bool) -> None:
    """Library log records and warnings (bitsandbytes' missing-kernel notice, transformers'
    deprecations) go to the log file; with --debug, to the terminal as well."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error" if not debug else "info")
    if not debug:  # "Loading weights" bars; ftl shows its own progress
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # MLflow logs to its own stderr handler ("Creating initial MLflow database tables…"); ftl says what matters
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    handlers: list[logging.Handler] = []
    try:
        path = log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
    except OSError:
        handlers.append(logging.NullHandler())  # an unwritable home must not stop the command
    if debug:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.captureWarnings(True)


def main() -> None:
    try:
        cli.main(prog_name="ftl", standalone_mode=False)
    except FtlError as exc:
        _fail(exc, exc.one_line())
    except ValidationError as exc:  # a config built outside ftl.cli.base.build
        _fail(exc, settings_error(exc, source="options").one_line())
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `ftl` or `ftl models`: the help, as always
        exc.show()
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "ftl"
        _fail(exc, f"{exc.format_message()} ({command}) — see `{command} --help`", code=exc.exit_code)
    except click.ClickException as exc:
        _fail(exc, exc.format_message(), code=exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # click turns Ctrl-C into Abort when it is not in standalone mode
        if isinstance(exc, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt):
            _fail(None, "interrupted — finished work is kept; run the same command again to resume", code=130)
        _fail(None, "aborted")
    except Exception as exc:  # noqa: BLE001 — the last guard: one line, never a traceback by surprise
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "no message"
        _fail(exc, f"unexpected {type(exc).__name__}: {detail} — --debug shows the traceback")


def _fail(exc: BaseException | None, line: str, code: int = 1) -> None:
    if _DEBUG["on"] and exc is not None:
        console.print_exception()
    # The line is the user's text (paths like runs/[exp]): never read it as rich markup.
    console.print("[bold red]error:[/] " + escape(line), highlight=False, soft_wrap=True)
    sys.exit(code)
