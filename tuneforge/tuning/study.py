"""tuneforge tune: an Optuna study over a recipe's search space, in a study folder.

    STUDY/study.json          what makes the folder a study's (its name and storage)
    STUDY/study.db            the study (SQLite) unless --storage names another database
    STUDY/study-recipe.yaml   the recipe searched (workers started by --workers read it)
    STUDY/trials/trial-N/     each trial's run directory; trial.json says how it ended
    STUDY/logs/               each trial's console output, each worker's
    STUDY/feature-cache/      frozen-prefix outputs shared by the trials (removed at the end)
    STUDY/trials.csv, best-recipe.yaml, summary.json, study.html, plots/   (report.py)

The same command continues a study: trials already done count, a trial whose worker died (no heartbeat for three
intervals) is marked failed and run again. Several workers, here (--workers K) or on other machines (the same
--storage and --study), share one study through the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from rich.console import Console

from tuneforge.artifacts import write_json_atomic, write_text_atomic
from tuneforge.config import Recipe, SearchSpec, load_recipe, parse_recipe, raw_recipe
from tuneforge.errors import RecipeError, TuneforgeError, first_line
from tuneforge.models.groups import layer_groups
from tuneforge.strategies.search import advised_point, enqueued_params, recipe_point, same_point, space_problems
from tuneforge.tasks.registry import get_task
from tuneforge.training.advise import advise
from tuneforge.training.assembly import load_data_and_model
from tuneforge.tuning.live import TrialTable
from tuneforge.tuning.report import StudySummary, write_report
from tuneforge.tuning.trial import ADVISED, AS_WRITTEN, LOGS_DIR, SHARED_CACHE_DIR, TRIALS_DIR, Objective, tidy_trials

STUDY_FILE, STUDY_RECIPE, MARKER, ADVICE_DIR = "study.db", "study-recipe.yaml", "study.json", "advice"
FINGERPRINT, ADVICE_PENDING = "recipe_fingerprint", "advice_pending"
STORAGE_VARIABLE = "TUNEFORGE_TUNE_STORAGE"  # --storage's default, and how --workers hands the URL to its workers


@dataclass(frozen=True)
class StudyPlan:
    """Where and how a study runs; the same for every worker of it."""

    recipe: Recipe
    study_dir: Path
    storage: str
    name: str
    shared: bool  # the storage was named (--storage): other workers may use it at the same time


def tune(recipe: str | Path | dict | Recipe, overrides: list[str] | None = None, trials: int = 10,
         timeout: float | None = None, storage: str | None = None, study: str | None = None, workers: int = 1,
         output_dir: str | Path | None = None, console: Console | None = None, worker_index: int | None = None
         ) -> StudySummary | None:
    """Run `trials` more trials of the recipe's study (split between `workers` local processes), then write the
    report and evaluate the best trial on the test split, once. Returns the study's summary (None for a worker
    started by another `tune`, which leaves the report to it)."""
    console = console or Console()
    written, source = raw_recipe(recipe, overrides)
    recipe = parse_recipe(written, source)
    if trials < 1 or workers < 1 or (timeout is not None and not timeout > 0):
        raise RecipeError(["--trials and --workers are at least 1, and --timeout is a number of seconds above 0"])
    storage = storage or os.environ.get(STORAGE_VARIABLE) or None  # a password stays off command lines
    study_dir = Path(output_dir) if output_dir else Path(f"{recipe.output_dir()}-tune")
    plan = StudyPlan(recipe, study_dir, _storage_url(storage, study_dir), study or recipe.name, storage is not None)
    if _in_memory(plan.storage):
        raise RecipeError([f"--storage {storage}: an in-memory database ends with the command (and is not shared with "
                           "workers or heartbeats); give a file or a server, or leave --storage out for the study "
                           "folder's SQLite file"])
    space = _checked_space(recipe, console, quiet=worker_index is not None)
    _claim(plan)
    spec = recipe.search or SearchSpec()  # the section's defaults
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is our one line, not optuna's traceback
    try:
        opened = _open_study(plan, spec, space, worker_index or 0)
        if not (study_dir / MARKER).is_file():  # the storage opened: the folder is this study's from now on
            write_json_atomic(study_dir / MARKER, _marker(plan))
        failed = _optimize(plan, opened, spec, space, trials, timeout, workers, worker_index, console)
        if worker_index is not None:
            return None
        shutil.rmtree(study_dir / SHARED_CACHE_DIR, ignore_errors=True)  # the trials of this command are done
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(opened)  # a worker that died during this command: failed, queued again
        tidy_trials(opened, study_dir, spec.keep_models)
        summary = write_report(opened, plan.recipe, written, space, study_dir, console)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if failed:
        raise TuneforgeError([f"worker(s) {', '.join(map(str, failed))} of {workers} ended with an error (see "
                              f"{study_dir / LOGS_DIR}); the report covers the trials that finished"])
    return summary


def _optimize(plan: StudyPlan, opened: optuna.Study, spec: SearchSpec, space: dict, trials: int,
              timeout: float | None, workers: int, worker_index: int | None, console: Console) -> list[int]:
    """Run the trials, here or in `workers` processes; the numbers of the workers that failed."""
    study_dir, recipe = plan.study_dir, plan.recipe
    if worker_index is None and workers > 1:
        return _run_workers(plan, opened, trials, timeout, workers, console)
    objective = Objective(study_dir, recipe.model_dump(mode="json"), space, spec.objectives,
                          prunes=len(spec.objectives) == 1 and spec.pruner != "none")
    table = TrialTable(opened, recipe.eval.metric, console, live=worker_index is None)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        tidy_trials(study, study_dir, spec.keep_models)
        table.refresh()

    with table:
        opened.optimize(objective, n_trials=trials, timeout=timeout, catch=(TuneforgeError,),
                        callbacks=[after_trial])
    return []


def _claim(plan: StudyPlan) -> None:
    """The study folder: new, empty, or one a study wrote (its study.json). Anything else is refused, so that the
    study never writes into, or removes model folders from, a folder it did not make."""
    folder = plan.study_dir
    if folder.exists() and not folder.is_dir():
        raise RecipeError([f"the study folder {folder} is a file; choose another --output-dir"])
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    # a first start that failed after opening the database leaves only these
    leftovers = {STUDY_FILE, f"{STUDY_FILE}.lock", f"{STUDY_FILE}-journal", f"{STUDY_FILE}-wal", f"{STUDY_FILE}-shm",
                 ADVICE_DIR, STUDY_RECIPE}
    if found and MARKER not in found and not set(found) <= leftovers:
        raise RecipeError([f"{folder} is not a tuneforge study folder (it holds {', '.join(found[:5])}"
                           f"{' …' if len(found) > 5 else ''}); choose a new or empty --output-dir"])
    if MARKER in found:
        try:
            claimed = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError):
            claimed = None
        if claimed != _marker(plan):
            raise RecipeError([f"{folder} holds another study ({folder / MARKER}: {claimed}); its trial folders are "
                               f"not this one's to write: choose another --output-dir, or the same --study and "
                               "--storage to continue that study"])
    folder.mkdir(parents=True, exist_ok=True)


def _marker(plan: StudyPlan) -> dict:
    """The study's name and storage; the folder's own SQLite file by its name, so a moved folder stays its study's."""
    own = plan.storage == _storage_url(None, plan.study_dir)  # however it was given (--workers hands it on)
    return {"study": plan.name, "storage": STUDY_FILE if own else _without_password(plan.storage)}


def _in_memory(url: str) -> bool:
    return url.startswith("sqlite") and url.split("://", 1)[-1] in ("", "/", "/:memory:")


def _storage_url(storage: str | None, study_dir: Path) -> str:
    if storage is None:
        return f"sqlite:///{(study_dir / STUDY_FILE).resolve()}"
    if storage.startswith(("postgresql://", "postgres://")):  # psycopg 3 is the driver tuneforge installs
        return "postgresql+psycopg://" + storage.split("://", 1)[1]
    return storage


def _checked_space(recipe: Recipe, console: Console, quiet: bool) -> dict:
    """The space to search (the recipe's, or its task's default), checked against the recipe before anything
    runs; the data and model are read and checked once here too, so a bad file fails now, not in trial 3."""
    data, loaded = load_data_and_model(recipe, Console(quiet=True) if quiet else console, main=not quiet)
    if "validation" not in data.splits:
        raise RecipeError(["tune compares trials on the validation split: give data.validation or "
                           "data.validation_fraction (the test split is only used once, for the best trial)"])
    task = get_task(recipe.task.type)
    blocks = sum(1 for group in layer_groups(loaded.model, loaded.head_prefixes) if group.name.startswith("block."))
    space = recipe.search.space if recipe.search is not None and recipe.search.space else task.search_space(recipe, blocks)
    problems = space_problems(space, recipe.model_dump(mode="json"), load_recipe)
    strategy = space.get("model.freeze.strategy")
    if recipe.model.freeze.strategy == "auto" or (strategy and strategy.holds("auto")):
        problems.append("model.freeze.strategy auto: `tuneforge advise` chooses one plan, tune compares plans; give "
                        "tune a concrete strategy (or search model.freeze.strategy over full, partial, head_only)")
    depth = space.get("model.freeze.trainable_blocks")
    deepest = _largest(depth) if depth is not None else None
    if deepest is not None and deepest > blocks:
        where = "search.space" if recipe.search is not None and recipe.search.space else "the default space (from the recipe)"
        problems.append(f"model.freeze.trainable_blocks: {where} reaches {deepest}, but the model has {blocks} blocks")
    if problems:
        raise RecipeError(problems)
    return space


def _fingerprint(recipe: Recipe) -> str:
    """What makes two commands the same study: the recipe and its search, not where it writes."""
    raw = recipe.model_dump(mode="json", exclude={"output"})
    for setting in ("keep_models", "heartbeat_seconds", "retries", "advice_first"):  # how the study runs, not what it searches
        (raw.get("search") or {}).pop(setting, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def _open_study(plan: StudyPlan, spec, space: dict, worker: int) -> optuna.Study:
    """Create the study, or continue it when the same recipe started it; the first trial is the recipe as written.
    Workers starting at the same moment take turns (a lock in the database, or on the SQLite file), so the tables
    and the study are created once and the first trial is queued once."""
    try:
        with _creation_lock(plan), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, grouped TPE
            study = _create_or_load(plan, spec, space)
        _queue_advice(plan, space, study)
    except (ImportError, ModuleNotFoundError) as error:
        raise RecipeError([f"--storage {_without_password(plan.storage)}: its database driver is not installed "
                           f"({first_line(error)}); for PostgreSQL: pip install 'tuneforge[postgres]'"]) from None
    except Exception as error:  # the database could not be reached or read: a clear one-line error
        if isinstance(error, TuneforgeError):
            raise
        raise RecipeError([f"the study storage {_without_password(plan.storage)} cannot be used: "
                           f"{type(error).__name__}: {first_line(error)}"]) from None
    # Seeded, yet never the same draws again: a continued study, or another worker, starts its own sequence (a
    # worker started by hand on a shared database may start beside another at the same moment: its process id too).
    alone = worker or (os.getpid() if plan.shared else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # grouped TPE, constant liar
        study.sampler = _sampler(spec, plan.recipe.train.seed + 7919 * alone + len(study.trials))
    return study


def _create_or_load(plan: StudyPlan, spec, space: dict) -> optuna.Study:
    recipe = plan.recipe
    directions = ["maximize" if recipe.eval.mode == "max" else "minimize"] + ["minimize"] * (len(spec.objectives) - 1)
    storage = optuna.storages.RDBStorage(
        plan.storage, engine_kwargs=_engine_settings(plan.storage), heartbeat_interval=spec.heartbeat_seconds,
        grace_period=3 * spec.heartbeat_seconds,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=spec.retries))
    study = optuna.create_study(storage=storage, study_name=plan.name, directions=directions,
                                pruner=_pruner(spec, space, recipe), load_if_exists=True)
    if [d.name.lower() for d in study.directions] != directions:
        raise RecipeError([f"study {plan.name!r} optimises {[d.name.lower() for d in study.directions]}, not "
                           f"{directions}: use another --study name"])
    started = study.user_attrs.get(FINGERPRINT)
    if started is None:
        study.set_user_attr(FINGERPRINT, _fingerprint(recipe))
        study.set_user_attr("metric", recipe.eval.metric)
    elif started != _fingerprint(recipe):
        raise RecipeError([f"study {plan.name!r} in {_without_password(plan.storage)} was started with another recipe "
                           "or search space; continue it with the same recipe, or start another (--study NAME or "
                           "--output-dir)"])
    write_text_atomic(plan.study_dir / STUDY_RECIPE, recipe.to_yaml())
    trials_dir = plan.study_dir / TRIALS_DIR
    if not study.trials and trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise RecipeError([f"study {plan.name!r} is not in {_without_password(plan.storage)}, yet {trials_dir} holds the "
                           "trials of an earlier one (its database was removed or replaced): choose another "
                           "--output-dir, or restore that database"])
    if not study.trials:
        point = recipe_point(space, recipe.model_dump(mode="json"))
        study.enqueue_trial(enqueued_params(space, point), user_attrs={AS_WRITTEN: True})
        if spec.advice_first and "model.freeze.strategy" in space:
            study.set_user_attr(ADVICE_PENDING, True)  # queued by _queue_advice, after minutes of measuring
    return study


def _queue_advice(plan: StudyPlan, space: dict, study: optuna.Study) -> None:
    """Queue what `tuneforge advise` recommends right after the recipe as written (trial 1 when one worker runs):
    the search starts from the two most informed points. Measured outside the creation lock (it takes minutes)
    and queued under it, once; a study whose advice was interrupted measures it again when it is next opened."""
    if not study.user_attrs.get(ADVICE_PENDING):
        return
    advised = _advice_point(plan, space)
    with _creation_lock(plan):
        if not study.user_attrs.get(ADVICE_PENDING):  # another worker queued it meanwhile
            return
        point = recipe_point(space, plan.recipe.model_dump(mode="json"))
        if advised is not None and same_point(advised, point):
            warnings.warn("tune: the advice is the recipe as written (trial 0); nothing more to queue", stacklevel=2)
        elif advised is not None:
            study.enqueue_trial(enqueued_params(space, advised), user_attrs={ADVISED: True})
        study.set_user_attr(ADVICE_PENDING, False)


def _advice_point(plan: StudyPlan, space: dict) -> dict | None:
    """The advice as a point of the space, or None (with a warning saying why) when it cannot be had."""
    try:
        rec = advise(plan.recipe, output_dir=plan.study_dir / ADVICE_DIR, console=Console(quiet=True)).recommendation
    except Exception as error:  # the advice is a head start, not a condition: the search goes on without it
        warnings.warn(f"tune: no advice to queue ({type(error).__name__}: {first_line(error)}); the search "
                      "starts from the recipe as written alone", stacklevel=2)
        return None
    advised = {"model.freeze.strategy": rec.strategy, "optim.lr": rec.lr, "train.epochs": rec.epochs}
    if rec.trainable_blocks:
        advised["model.freeze.trainable_blocks"] = rec.trainable_blocks
    point = advised_point(space, plan.recipe.model_dump(mode="json"), advised)
    if point is None:
        warnings.warn(f"tune: the advice ({rec.strategy}) is not among the space's choices of "
                      "model.freeze.strategy; the search starts from the recipe as written alone", stacklevel=2)
    return point


@contextlib.contextmanager
def _creation_lock(plan: StudyPlan):
    """One worker at a time creates or opens the study: a PostgreSQL advisory lock, or a lock on the SQLite file."""
    if plan.storage.startswith("sqlite:///") and not _in_memory(plan.storage):
        with open(plan.storage.removeprefix("sqlite:///") + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    if not plan.storage.startswith("postgresql"):
        yield
        return
    key = int(hashlib.sha256(plan.name.encode()).hexdigest()[:15], 16)  # fits PostgreSQL's bigint
    engine = sqlalchemy.create_engine(plan.storage, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def _engine_settings(url: str) -> dict:
    if url.startswith("sqlite"):  # several local workers write to one file: wait for the lock, do not fail
        return {"connect_args": {"timeout": 120}}
    return {"pool_pre_ping": True}


def _without_password(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://…@{rest.split('@', 1)[1]}"


def _sampler(spec, seed: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "tpe":
        # group: conditional keys (trainable_blocks only with partial) get their own models; constant liar: workers
        # running side by side do not all try the same promising point
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=5)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed)


def _pruner(spec, space: dict, recipe: Recipe) -> optuna.pruners.BasePruner:
    """Steps are hundredths of an epoch. Median: stop a trial whose validation is below the median of earlier
    trials at the same point (after two trials have finished). Hyperband: successive halving over budgets from
    one epoch to the longest trial."""
    if spec.pruner == "none" or len(spec.objectives) > 1:
        return optuna.pruners.NopPruner()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    epochs = _largest(space["train.epochs"]) if "train.epochs" in space else recipe.train.epochs
    return optuna.pruners.HyperbandPruner(min_resource=100, max_resource=max(100, int(epochs or 1) * 100),
                                          reduction_factor=3)


def _largest(param) -> int | None:
    """The largest value a numeric key can take (an int range's high end, or its largest numeric choice)."""
    if param.int_ is not None or param.float_ is not None:
        return int((param.int_ or param.float_)[1])
    numbers = [c for c in param.categorical if isinstance(c, (int, float)) and not isinstance(c, bool)]
    return int(max(numbers)) if numbers else None


def _run_workers(plan: StudyPlan, study: optuna.Study, trials: int, timeout: float | None, workers: int,
                 console: Console) -> list[int]:
    """K local worker processes, each `tuneforge tune` on the same study, sharing the CPU's threads; the trials are
    split between them. This process shows the study's table while they work."""
    shares = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
    threads = max(1, (os.cpu_count() or 1) // workers)
    logs = plan.study_dir / LOGS_DIR
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index, share in enumerate(shares):
        if share == 0:
            continue
        command = [sys.executable, "-m", "tuneforge", "tune", str(plan.study_dir / STUDY_RECIPE), "--trials", str(share),
                   "--study", plan.name, "--output-dir", str(plan.study_dir), "--worker-index", str(index + 1)]
        if timeout is not None:
            command += ["--timeout", str(timeout)]
        # the storage URL (and any password in it) by the environment: command lines are visible to every user
        env = {**os.environ, STORAGE_VARIABLE: plan.storage, "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        with (logs / f"worker-{index + 1}.log").open("w") as log:
            children.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    table = TrialTable(study, plan.recipe.eval.metric, console, live=True)
    with table:
        while any(child.poll() is None for child in children):
            table.refresh()
            time.sleep(2)
        table.refresh()
    return [i + 1 for i, child in enumerate(children) if child.returncode != 0]
