"""MkDocs hook: builds the configuration reference from fedsim's config classes at build time.

Every page whose text holds the marker ``<!-- fedsim:config-reference -->`` gets, in its place, one
table per config section (``data:``, ``model:``, ``engine:``, ``sweep:``) and one per
``algorithm:`` name: each key with its type (allowed values for a choice), default and
description, and the class's own docstring. The page cannot go stale: it is read from the
classes that validate the files.
"""

from __future__ import annotations

import inspect
import re
import typing

MARKER = "<!-- fedsim:config-reference -->"


def _type(annotation) -> str:
    """A short, readable type: ``"a" | "b"`` for a Literal, ``int | None`` for an Optional."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{v!r}`".replace("'", '"') for v in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    text = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return text if origin is None else str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`"
    value = field.default
    if value is None:
        return "null"
    if value is ...:
        return "required"
    return f"`{value!r}`".replace("'", '"')


def _doc(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    return re.sub(r"\s*\n\s*", " ", doc).strip()


def _table(cls, skip: tuple[str, ...] = ()) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
    return "\n".join(rows)


def reference() -> str:
    """The reference as Markdown."""
    from fedsim import config

    out = []
    for key, cls in (
        ("data", config.DataConfig),
        ("model", config.ModelConfig),
        ("engine", config.EngineConfig),
        ("sweep", config.SweepConfig),
    ):
        out += [f"## `{key}:`", "", _doc(cls), "", _table(cls), ""]
    top = [
        n
        for n in config.ExperimentConfig.model_fields
        if n not in ("data", "model", "engine", "sweep", "runs")
    ]
    out += [
        "## Top-level keys",
        "",
        _table(config.ExperimentConfig, skip=("data", "model", "engine", "sweep", "runs")),
        "",
    ]
    del top
    out += [
        "## `runs:` entries, per `algorithm:`",
        "",
        "Every run takes the keys of its algorithm's config class; a key that does not apply to the "
        "algorithm is an error. Common keys (`RunConfig`):",
        "",
        _table(config.RunConfig),
        "",
    ]
    base = set(config.RunConfig.model_fields)
    for name, cls in sorted(config.run_configs().items()):
        own = tuple(
            k
            for k in cls.model_fields
            if k not in base or cls.model_fields[k].default != config.RunConfig.model_fields[k].default
        )
        out += [f"### `algorithm: {name}` ({cls.__name__})", "", _doc(cls), ""]
        if own:
            out += [
                "Keys of its own, or defaults that differ from `RunConfig`'s:",
                "",
                _table(cls, skip=tuple(k for k in cls.model_fields if k not in own)),
                "",
            ]
        else:
            out += ["No keys beyond `RunConfig`'s.", ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    return markdown
