"""Blueprints: YAML in (OmegaConf), a validated model description out (pydantic)."""

from hyloom.blueprint.errors import BlueprintError, Problem
from hyloom.blueprint.load import Loaded, builtin_names, load, to_yaml
from hyloom.blueprint.schema import blueprint_model, component_union, json_schema, validate


def load_blueprint(ref: str, overrides=()):
    """Load, merge, override and validate a blueprint (a path or 'builtin:NAME')."""
    return validate(load(ref, overrides))


__all__ = ["BlueprintError", "Problem", "Loaded", "load", "validate", "load_blueprint", "blueprint_model",
           "component_union", "json_schema", "builtin_names", "to_yaml"]
