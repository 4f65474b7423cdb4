"""The base of every recipe section."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default. NaN and infinity are
    # never a meaningful setting (a learning rate, a weight decay, a dropout).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info: ValidationInfo):
        # YAML's true and false would otherwise pass as 1 and 0 (batch_size: true).
        if isinstance(value, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("true or false is not a value of this setting")
        return value


def _accepts_bool(annotation) -> bool:
    if annotation is bool or annotation is typing.Any:
        return True
    if isinstance(annotation, str):  # a forward reference: do not guess
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_accepts_bool(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(isinstance(arg, bool) for arg in typing.get_args(annotation))
    return False
