"""Command line: each subcommand is a thin wrapper over a plain function.

Exit codes: 0 success, 2 a problem with the user's input (recipe, data, model, resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed

if torch.distributed.is_available():
    # Imported before a command can start a process group: DDP imports it later (through torch._dynamo), and
    # its functions then keep the group as default arguments for good, so destroying the group would leave
    # gloo's threads running. Imported now, they keep None.
    import torch.distributed.nn  # noqa: F401

from tuneforge.errors import RecipeError, TuneforgeError
from tuneforge.training.advise import advise
from tuneforge.training.lr_find import find_lr
from tuneforge.training.run import finetune
from tuneforge.tuning.study import tune
from tuneforge.use.evaluate import evaluate_run, predict_run
from tuneforge.use.export import export_run
from tuneforge.use.inspect import inspect_model
from tuneforge.use.serve import ServeSettings, serve


def _train(args) -> None:
    finetune(args.recipe, args.overrides, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite)


def _tune(args) -> None:
    tune(args.recipe, args.overrides, trials=args.trials, timeout=args.timeout, storage=args.storage, study=args.study,
         workers=args.workers, output_dir=args.output_dir, worker_index=args.worker_index)


def _advise(args) -> None:
    advise(args.recipe, args.overrides, output_dir=args.output_dir, range_test_steps=args.range_test_steps)


def _lr_find(args) -> None:
    find_lr(args.recipe, args.overrides, output_dir=args.output_dir, start_lr=args.start_lr, end_lr=args.end_lr,
            steps=args.steps)


def _evaluate(args) -> None:
    metrics = evaluate_run(args.run, args.data, output=args.output, factory=args.trust_factory)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("confusion_matrix", "per_class")}, indent=2))


def _predict(args) -> None:
    count = predict_run(args.run, args.input, args.output, args.draw, factory=args.trust_factory)
    print(f"wrote {count} predictions to {args.output}")


def _inspect(args) -> None:
    if args.recipe is not None and args.model is not None and "=" in args.model:  # an override, not a model
        args.overrides, args.model = [args.model, *args.overrides], None
    if args.model is None and args.recipe is None:
        raise RecipeError(["inspect needs a MODEL or --recipe RECIPE"])
    inspect_model(args.model, weights=args.weights, num_labels=args.num_labels, recipe=args.recipe,
                  overrides=args.overrides, factory=args.trust_factory)


def _export(args) -> None:
    result = export_run(args.run, args.format, args.output, overwrite=args.overwrite, factory=args.trust_factory)
    check = "" if result.max_abs_diff is None else f"; max |logit difference| vs PyTorch {result.max_abs_diff:.2e}"
    print(f"exported {args.format} to {result.folder} (model card: {result.folder / 'README.md'}){check}")


def _serve(args) -> None:
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise RecipeError([f"--token-env {args.token_env}: that environment variable is not set or empty"])
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                             max_inputs=args.max_inputs, max_text_chars=args.max_text_chars,
                             max_concurrent=args.max_concurrent, timeout_s=args.timeout, token=token)
    serve(args.run, args.host, args.port, settings, factory=args.trust_factory)


TRUST_FACTORY_HELP = ("a model built by a factory: the factory you trust to rebuild it, 'package.module:function' "
                      "(found on PYTHONPATH) or 'path/to/file.py:function'; it must match the one the model folder "
                      "names. Nothing named inside a model folder is ever imported or run without it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune pretrained models from a YAML recipe.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune as a recipe says")
    train.add_argument("recipe", help="YAML recipe")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.epochs=1 optim.lr=1e-4")
    train.add_argument("--output-dir", help="run directory (default: the recipe's output.dir)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.set_defaults(handler=_train)

    _add_tune(commands)

    advise = commands.add_parser("advise", help="before training: measure the data and the frozen features, "
                                                "recommend a strategy, check the recipe's plan")
    advise.add_argument("recipe", help="YAML recipe")
    advise.add_argument("overrides", nargs="*", help="key.path=value overrides")
    advise.add_argument("--output-dir", help="folder for advice.json and the range tests (default: run directory + -advise)")
    advise.add_argument("--range-test-steps", type=int, default=60, help="steps of each LR range test (default 60)")
    advise.set_defaults(handler=_advise)

    lr_find = commands.add_parser("lr-find", help="LR range test: plot loss vs learning rate and suggest an LR")
    lr_find.add_argument("recipe", help="YAML recipe")
    lr_find.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr_strategy=single")
    lr_find.add_argument("--output-dir", help="folder for lr_find.png and .json (default: run directory + -lr-find)")
    lr_find.add_argument("--start-lr", type=float, default=1e-7, help="LR of the first step (default 1e-7)")
    lr_find.add_argument("--end-lr", type=float, default=1.0, help="LR of the last step (default 1)")
    lr_find.add_argument("--steps", type=int, default=100, help="optimizer steps, fewer on divergence (default 100)")
    lr_find.set_defaults(handler=_lr_find)

    evaluate = commands.add_parser("evaluate", help="metrics of a run's model on a labelled file or image folder")
    evaluate.add_argument("run", help="run directory (or its model/ folder)")
    evaluate.add_argument("--data", required=True, help="labelled data, same format and columns as in training")
    evaluate.add_argument("--output", help="also write all metrics to this JSON file")
    evaluate.add_argument("--trust-factory", metavar="REF", help=TRUST_FACTORY_HELP)
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", help="labels and probabilities for new inputs")
    predict.add_argument("run", help="run directory (or its model/ folder)")
    predict.add_argument("--input", required=True, help="table with the text column, an image, or a folder of images")
    predict.add_argument("--output", required=True, help=".jsonl or .csv file to write")
    predict.add_argument("--draw", help="detection: also write each image with its boxes drawn into this folder")
    predict.add_argument("--trust-factory", metavar="REF", help=TRUST_FACTORY_HELP)
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="write a run's model for deployment, with a model card")
    export.add_argument("run", help="run directory (or its model/ folder)")
    export.add_argument("--format", required=True, choices=["hf", "onnx", "torch-export"],
                        help="hf: from_pretrained folder; onnx: checked with onnxruntime; torch-export: a .pt2 program")
    export.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    export.add_argument("--overwrite", action="store_true", help="replace the output folder")
    export.add_argument("--trust-factory", metavar="REF", help=TRUST_FACTORY_HELP)
    export.set_defaults(handler=_export)

    _add_serve(commands)

    inspect = commands.add_parser("inspect", help="show a model's layer groups with parameter counts")
    inspect.add_argument("model", nargs="?", help="Hugging Face folder / Hub id / pkg:PACKAGE/dir, 'module:function', "
                         "or a run directory (with --recipe: the recipe's model)")
    inspect.add_argument("--recipe", help="also show, per stage of this recipe's freezing plan, what trains")
    inspect.add_argument("overrides", nargs="*", help="key.path=value overrides for --recipe")
    inspect.add_argument("--weights", help="weights file for a 'module:function' model")
    inspect.add_argument("--num-labels", type=int, default=2, help="size of the head to attach (default 2)")
    inspect.add_argument("--trust-factory", metavar="REF", help=TRUST_FACTORY_HELP)
    inspect.set_defaults(handler=_inspect)
    return parser


def _add_tune(commands) -> None:
    tune = commands.add_parser("tune", help="search strategies and hyperparameters (Optuna); the first trial is "
                                            "the recipe as written")
    tune.add_argument("recipe", help="YAML recipe; its search section says what to search (default: the task's space)")
    tune.add_argument("overrides", nargs="*", help="key.path=value overrides of the recipe")
    tune.add_argument("--trials", type=int, default=10, help="how many more trials to run (default 10; split between "
                                                             "--workers)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tune.add_argument("--storage", help="database URL shared by workers, e.g. postgresql://user:pass@host/db "
                                        "(default: $TUNEFORGE_TUNE_STORAGE, which keeps a password off the command "
                                        "line, else STUDY/study.db, SQLite)")
    tune.add_argument("--study", help="study name in the storage (default: the recipe's name)")
    tune.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study (default 1)")
    tune.add_argument("--output-dir", help="study folder (default: the recipe's output.dir + -tune)")
    tune.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers for its processes
    tune.set_defaults(handler=_tune)


def _add_serve(commands) -> None:
    defaults = ServeSettings()
    serve = commands.add_parser("serve", help="serve a model over HTTP (POST /predict, /health, /ready, /metadata)")
    serve.add_argument("run", help="run directory, its model/ folder, or an hf export")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=defaults.max_batch, help="inputs per forward pass (1: no micro-batching)")
    serve.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, help="how long a batch waits to fill up")
    serve.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger bodies get 413")
    serve.add_argument("--max-inputs", type=int, default=defaults.max_inputs, help="more inputs per request get 422")
    serve.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars, help="longer texts get 422")
    serve.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent, help="more requests in flight get 429")
    serve.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request before 504")
    serve.add_argument("--token-env", help="require 'Authorization: Bearer TOKEN', TOKEN read from this environment variable")
    serve.add_argument("--trust-factory", metavar="REF", help=TRUST_FACTORY_HELP)
    serve.set_defaults(handler=_serve)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with key.path=value overrides accepted anywhere on it (also after the options)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def end_process_group(finished: bool) -> None:
    """Destroy the torch.distributed process group a multi-process command (torchrun) started, if any.

    Left to interpreter exit, the group is never freed: gloo's connection loop and worker threads
    are still running while the process tears itself down, the teardown in which a worker was seen
    to die with SIGABRT ("terminate called without an active exception"). After a finished
    command the processes first wait for each other, so none closes its connections while another
    still uses them; after an error they do not, as the others may never reach that barrier.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    if finished:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    finished = False
    try:
        args.handler(args)
        finished = True
    except TuneforgeError as error:
        print(f"error: {error.render()}", file=sys.stderr)
        return 2
    finally:
        end_process_group(finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
