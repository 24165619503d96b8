"""MkDocs hooks: pages generated from the code, so nothing is written twice.

`<!-- config-reference -->` in a page becomes the full config reference: one table
per section of `train.config.Config` and one per task in `train.data.TASKS`, each row a
dataclass field with its type, default (as YAML) and the `help` text of its metadata (what
`ssm-train --help` prints).
"""

from __future__ import annotations

import dataclasses
import typing

CONFIG_REFERENCE = "<!-- config-reference -->"


def _type_name(tp) -> str:
    from train import config as config_lib

    name = getattr(config_lib, "_type_name", None)
    return name(tp) if name is not None else str(tp).replace("typing.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    import yaml

    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    text = text.removesuffix("...").strip()  # a bare scalar ends its YAML document
    return f"`{text}`"  # a pipe inside a code span does not split the cell


def _rows(cls, prefix: str, skip: tuple[str, ...] = ()) -> tuple[list[str], list]:
    """Table rows of the plain fields of `cls` and the nested dataclass sections."""
    hints = typing.get_type_hints(cls)
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.append((key, tp))
            continue
        help_text = f.metadata.get("help", "")
        rows.append(
            f"| `{key}` | `{_type_name(tp)}` | {_code(_default(f))} | {_cell(help_text)} |"
        )
    return rows, sections


def _table(rows: list[str]) -> list[str]:
    return ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]


def config_reference() -> str:
    """The config reference, as Markdown, from the dataclasses of `train.config`."""
    from train import config as config_lib, data as data_lib

    out: list[str] = []
    rows, sections = _rows(config_lib.Config, "", skip=("task",))
    out += ["### Top level", "", *_table(rows)]
    while sections:
        key, cls = sections.pop(0)
        rows, nested = _rows(cls, key)
        doc = (cls.__doc__ or "").strip().splitlines()
        out += [f"### `{key}`", ""]
        if doc:
            out += [doc[0], ""]
        out += _table(rows)
        sections = nested + sections
    out += [
        "### `task`",
        "",
        "`task.name` picks the task; each task has its own keys "
        f"({', '.join(f'`{n}`' for n in data_lib.TASKS)}).",
        "",
    ]
    for name, cls in data_lib.TASKS.items():
        rows, _ = _rows(cls, "task", skip=("name",))
        doc = (cls.__doc__ or "").strip()
        out += [f"#### `task.name: {name}`", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        out += _table(rows)
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CONFIG_REFERENCE in markdown:
        markdown = markdown.replace(CONFIG_REFERENCE, config_reference())
    return markdown
