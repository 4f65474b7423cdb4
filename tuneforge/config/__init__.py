"""The recipe: its sections (pydantic), and reading it from YAML with overrides and ${VAR} expansion."""

from tuneforge.config.base import Section
from tuneforge.config.data import AugmentSpec, ColorJitterSpec, DataSpec
from tuneforge.config.loading import apply_overrides, default_data_dir, load_recipe, parse_recipe, raw_recipe, read_yaml
from tuneforge.config.model import SELECTORS_HELP, AdapterSpec, FreezeSpec, ImageSpec, ModelSpec, StageSpec
from tuneforge.config.recipe import TASK_DATA_KEYS, Recipe, TaskSpec
from tuneforge.config.search import ParamSpec, SearchSpec
from tuneforge.config.training import EarlyStoppingSpec, EvalSpec, OptimSpec, OutputSpec, ScheduleName, ScheduleSpec, TrainSpec

__all__ = ["SELECTORS_HELP", "TASK_DATA_KEYS", "AdapterSpec", "AugmentSpec", "ColorJitterSpec", "DataSpec", "EarlyStoppingSpec",
           "EvalSpec", "FreezeSpec", "ImageSpec", "ModelSpec", "OptimSpec", "OutputSpec", "ParamSpec", "Recipe", "SearchSpec",
           "ScheduleName",
           "ScheduleSpec", "Section", "StageSpec", "TaskSpec", "TrainSpec", "apply_overrides", "default_data_dir",
           "load_recipe", "parse_recipe", "raw_recipe", "read_yaml"]
