"""docs/CONFIG.md, generated from the run config's schema: every section and key with its type, default
and description (``python -m pipeline.config_doc > docs/CONFIG.md``, ``make config-doc``).

The sections come from the models themselves (``pipeline.config.run_config_model``: the shared sections and
each built-in stage's section from the registry), so the page cannot drift from the code;
tests/unit/test_config_doc.py fails when the committed page is stale or a field has no description.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import run_config_model
from .registry import specs

HEADER = """# Configuration reference

Generated from the code by `python -m pipeline.config_doc` (`make config-doc`); do not edit by hand.
Every key of a run config, section by section: its type, its default and what it does. A config file sets
only what differs from the defaults (`configs/tiny.yaml`, `configs/demo.yaml`); `key=value` overrides on
the command line use the same dotted names (`sft.train.learning_rate=1e-4`). Relative paths are looked up
in the config file's folder, then the working directory, then among alignpipe's shipped files.

Stage sections are declared beside their stages (`stages/<package>/config.py`, `stages/<stage>_config.py`);
the shared building blocks in `pipeline/sections.py`, the run's own sections in `pipeline/config.py`. A run
that adds stages (`extra_stages`) gets their sections too (not listed here).
"""


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """(the section model inside ``annotation``, how it nests: "", "[]" for a list, ".<name>" for a dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and args:
        model, _ = _model_in(args[0])
        return model, "[]"
    if origin is dict and len(args) == 2:
        model, _ = _model_in(args[1])
        return model, ".<name>"
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            model, nest = _model_in(arg)
            if model is not None:
                return model, nest
    return None, ""


def type_name(annotation: Any) -> str:
    """``int | None``, ``list[str]``, ``'sft' | 'base'``: the annotation as a reader writes it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return json.dumps(value, default=lambda v: v.model_dump(mode="json") if isinstance(v, BaseModel) else str(v))


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted path, model) of ``model`` and every section under it, depth first, each model once per path."""
    yield prefix, model
    for name, field in model.model_fields.items():
        inner, nest = _model_in(field.annotation)
        if inner is not None:
            yield from sections(inner, f"{prefix}.{name}{nest}" if prefix else f"{name}{nest}")


def missing_descriptions(model: type[BaseModel]) -> list[str]:
    """Dotted keys of every field under ``model`` without a description (tests/unit/test_config_doc.py)."""
    return [f"{path}.{name}" if path else name for path, section in sections(model)
            for name, field in section.model_fields.items() if not (field.description or "").strip()]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole page (Markdown)."""
    root = run_config_model()
    owners = {spec.name: spec.config_model.__module__ for spec in specs()}
    lines = [HEADER]
    first: dict[type[BaseModel], str] = {}  # a section model shown already -> where
    for path, model in sections(root):
        title = path or "(top level)"
        lines += [f"## `{title}`", ""]
        if model in first:
            lines += [f"`{model.__name__}`: the keys of `{first[model]}` above.", ""]
            continue
        first[model] = title
        top = path.split(".")[0].split("[")[0]
        where = owners.get(top) if path else None
        doc = " ".join((model.__doc__ or "").split())
        if path and doc:
            lines += [_cell(doc), ""]
        lines += [f"Declared in `{(where or model.__module__).replace('.', '/')}.py` (`{model.__name__}`).", "",
                  "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            lines.append(f"| `{name}` | `{_cell(type_name(field.annotation))}` | `{_cell(default_text(field))}` | "
                         f"{_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
