"""Recipes: flat YAML files of ``field: value`` defaults for the settings dataclasses, overridden by flags.

A recipe's keys are the fields of the dataclasses a script parses (its own arguments and
:class:`hf_distill.DistillationConfig`). The recipe sets the defaults, command-line flags override them,
and an unknown key is an error. Both applications parse their recipes with :class:`RecipeParser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import yaml
from transformers import HfArgumentParser

from .errors import InputError


def _field_names(dataclass_types) -> set[str]:
    return {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init}


def read_recipe(path: str | os.PathLike, dataclass_types) -> dict[str, Any]:
    """The recipe's settings; ``ValueError`` when a key is not a field of ``dataclass_types``."""
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"Cannot read the recipe {path}: {type(err).__name__}: {err}") from err
    if not isinstance(recipe, dict):
        raise InputError(
            f"{path}: a recipe is a flat YAML mapping of field: value, got {type(recipe).__name__}."
        )
    unknown = sorted(set(recipe) - _field_names(dataclass_types))
    if unknown:
        raise InputError(
            f"{path}: unknown recipe keys {unknown}. Keys must be fields of "
            f"{', '.join(d.__name__ for d in dataclass_types)}; see the script's --help."
        )
    return recipe


class RecipeParser(HfArgumentParser):
    """``HfArgumentParser`` with ``--config recipe.yaml``: the recipe's values become the defaults and
    command-line flags override them (as TRL's ``TrlParser`` does)."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument("--config", default=None, help="Recipe: a flat YAML file of field: value defaults.")

    def parse_recipe_and_args(self, args: list[str] | None = None) -> tuple[Any, ...]:
        """The dataclasses filled from ``--config`` (if given) overridden by ``args`` (default ``sys.argv``)."""
        args = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(args)
        if known.config is not None:
            recipe = self._typed_recipe(known.config, read_recipe(known.config, self.dataclass_types))
            # argparse parses string defaults with the field's type, as if given as flags: YAML reads
            # ``5e-5`` as a string, which becomes a float here.
            self.set_defaults(**recipe)
            for action in self._actions:  # a recipe can provide what is otherwise required
                if action.dest in recipe:
                    action.required = False
        try:
            *outputs, remaining = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        except Exception as err:  # re-raised with the recipe's keys, the cause chained
            if known.config is None:
                if isinstance(err, ValueError):  # a __post_init__ refused a flag's value
                    raise InputError(str(err)) from err
                raise
            # A value the checks above let through but a dataclass refused (TrainingArguments raises
            # TypeError, OSError, ImportError... from deep inside): name the recipe keys refused alone.
            keys = self._refused_keys(recipe) or sorted(recipe)
            raise InputError(
                f"{known.config}: the settings were refused ({type(err).__name__}: {err}). "
                f"{'Recipe key' if len(keys) == 1 else 'Recipe keys'}: {', '.join(map(repr, keys))}; "
                "see `--help` for each key's type and range."
            ) from err
        if remaining:
            raise InputError(f"Unknown command-line arguments {remaining}; see --help.")
        # The last output is the namespace left over (``config``): not a dataclass.
        return tuple(o for o in outputs if dataclasses.is_dataclass(o))

    def _typed_recipe(self, path: str, recipe: dict[str, Any]) -> dict[str, Any]:
        """The recipe's values converted as the same values given as flags would be.

        argparse converts string defaults only, so a YAML list, number or null would otherwise reach
        the dataclasses unchecked. Raises ``ValueError`` naming the key, the value and the type expected.
        """
        # The `--key` action (a bool field also has a `--no_key` one with the same dest).
        actions = {a.dest: a for a in self._actions if f"--{a.dest}" in a.option_strings}
        optional = {
            f.name
            for d in self.dataclass_types
            for f in dataclasses.fields(d)
            if f.default is None or "None" in str(f.type)
        }
        typed = {}
        for key, value in recipe.items():
            action = actions[key]
            kind = getattr(action.type, "__name__", "a value")
            listed = action.nargs in ("+", "*")
            try:
                if value is None:
                    if key not in optional:
                        raise ValueError("null is not allowed here")
                    typed[key] = None
                    continue
                if isinstance(value, dict) and "dict" in str(action.type or "") + str(self._field_type(key)):
                    typed[key] = value
                    continue
                if listed != isinstance(value, list) or isinstance(value, dict):
                    raise ValueError(f"expected {'a list of ' if listed else 'a single '}{kind}")
                items = [_convert(action, item) for item in (value if listed else [value])]
                typed[key] = items if listed else items[0]
            except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
                choices = f" (one of {list(action.choices)})" if action.choices else ""
                raise InputError(
                    f"{path}: recipe key {key!r} has {value!r}: {err}. Expected {'a list of ' if listed else ''}"
                    f"{kind}{choices}; see `--help` ({action.help or 'no help'})."
                ) from None
        return typed

    def _refused_keys(self, recipe: dict[str, Any]) -> list[str]:
        """The recipe's keys whose value alone (over the defaults) its dataclass refuses."""
        refused = []
        for key, value in recipe.items():
            owner = next(d for d in self.dataclass_types if key in _field_names([d]))
            kwargs = {key: value}
            if "output_dir" in _field_names([owner]):
                kwargs.setdefault("output_dir", recipe.get("output_dir", "out"))
            try:
                owner(**kwargs)
            except Exception:  # whatever the dataclass raised: only which key matters here
                refused.append(key)
        return refused

    def _field_type(self, key: str) -> Any:
        return next(f.type for d in self.dataclass_types for f in dataclasses.fields(d) if f.name == key)


def _convert(action: argparse.Action, item: Any) -> Any:
    """``item`` as argparse would parse it from the command line, checked against the choices."""
    if isinstance(item, list | dict):
        raise ValueError("a nested list or mapping is not allowed here")
    value = action.type(item if isinstance(item, str) else str(item)) if action.type else item
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of the choices")
    return value
