"""`strata templates`: the prompt templates of a templates directory (offline).

    strata templates [list] [--dir config/templates] [--json]
    strata templates show NAME[@VERSION] [--json]      a version (default: the latest)

The directory is --dir, else $STRATA_ORCHESTRATOR_TEMPLATES_DIR, else config/templates. It
is loaded by the orchestrator's own loader first, so a template the orchestrator would
refuse exits 2 with its message. Versions stored at run time in Redis are not shown.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.settings import ConfigError
from services.orchestrator.templates import TemplateStore, version_key
from strata_cli.client import ROOT, print_json, usage_error


@dataclass(frozen=True, slots=True)
class Variable:
    """A declared variable."""

    name: str
    type: str
    required: bool
    default: Any = None
    description: str = ""

    def label(self) -> str:
        """`question*` (required), `tone=friendly` (default), `audience?` (optional)."""
        if self.required:
            return f"{self.name}*"
        if self.default is None:
            return f"{self.name}?"
        return f"{self.name}={json.dumps(self.default, ensure_ascii=False)}"


@dataclass(frozen=True, slots=True)
class TemplateVersion:
    """A template's version as its file declares it."""

    name: str
    version: str
    description: str
    variables: list[Variable]
    messages: list[dict[str, str]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "variables": [
                {
                    "name": v.name,
                    "type": v.type,
                    "required": v.required,
                    **({"default": v.default} if v.default is not None else {}),
                    **({"description": v.description} if v.description else {}),
                }
                for v in self.variables
            ],
            "messages": self.messages,
        }


def load_templates(directory: Path) -> dict[str, list[TemplateVersion]]:
    """The templates of `directory` by name, versions oldest first; ConfigError when the
    orchestrator would refuse the directory."""
    TemplateStore(directory)  # validates and compiles as the orchestrator does
    templates: dict[str, list[TemplateVersion]] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            continue
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        versions = []
        for version, spec in sorted(raw["versions"].items(), key=lambda item: version_key(item[0])):
            variables = []
            for declared in spec.get("variables") or ():
                has_default = "default" in declared
                required = declared.get("required", not has_default)
                variables.append(
                    Variable(
                        name=declared["name"],
                        type=declared["type"],
                        required=bool(required),
                        default=declared.get("default"),
                        description=declared.get("description", ""),
                    )
                )
            versions.append(
                TemplateVersion(
                    name=raw["name"],
                    version=version,
                    description=" ".join(str(spec.get("description", "")).split()),
                    variables=variables,
                    messages=[
                        {"role": m["role"], "content": m["content"]} for m in spec["messages"]
                    ],
                )
            )
        templates[raw["name"]] = versions
    return templates


def format_templates(templates: dict[str, list[TemplateVersion]]) -> str:
    """A line a template (name, versions), then a line a version with its variables."""
    if not templates:
        return "(no templates)"
    lines = []
    for name, versions in templates.items():
        lines.append(f"{name}  (versions {', '.join(v.version for v in versions)})")
        for v in versions:
            variables = ", ".join(variable.label() for variable in v.variables) or "-"
            lines.append(f"  @{v.version:<6}{variables}")
            if v.description:
                lines.append(f"         {v.description}")
    lines.append("(* required, ? optional, =default)")
    return "\n".join(lines)


def format_version(template: TemplateVersion) -> str:
    """One version in full: description, variables, messages."""
    lines = [f"{template.name}@{template.version}"]
    if template.description:
        lines.append(template.description)
    lines.append("")
    lines.append("variables:")
    for v in template.variables:
        note = "required" if v.required else f"default {v.label().partition('=')[2] or 'null'}"
        extra = f" · {v.description}" if v.description else ""
        lines.append(f"  {v.name:<16}{v.type:<9}{note}{extra}")
    if not template.variables:
        lines.append("  (none)")
    for message in template.messages:
        lines.append("")
        lines.append(f"[{message['role']}]")
        lines.append(message["content"].rstrip("\n"))
    return "\n".join(lines)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `strata templates`, `strata templates list` and `strata templates show`."""
    templates = commands.add_parser("templates", help="list and show prompt templates (offline)")
    _arguments(templates)
    templates.set_defaults(run=run_list)
    verbs = templates.add_subparsers(dest="verb")
    listing = verbs.add_parser("list", help="every template, its versions and variables")
    _arguments(listing, suppress=True)
    listing.set_defaults(run=run_list)
    show = verbs.add_parser("show", help="one version in full")
    show.add_argument("ref", metavar="NAME[@VERSION]")
    _arguments(show, suppress=True)
    show.set_defaults(run=run_show)


def _arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    # Under a verb the options default to SUPPRESS, so those given before the verb stay.
    parser.add_argument(
        "--dir",
        type=Path,
        default=argparse.SUPPRESS
        if suppress
        else Path(
            os.environ.get("STRATA_ORCHESTRATOR_TEMPLATES_DIR", ROOT / "config" / "templates")
        ),
        help="templates directory (default: $STRATA_ORCHESTRATOR_TEMPLATES_DIR or "
        "config/templates)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print one JSON document",
    )


def _load(args: argparse.Namespace) -> dict[str, list[TemplateVersion]] | int:
    try:
        return load_templates(args.dir)
    except ConfigError as err:
        return usage_error(str(err))


def run_list(args: argparse.Namespace) -> int:
    """`strata templates [list]`."""
    templates = _load(args)
    if isinstance(templates, int):
        return templates
    if args.json:
        print_json(
            {
                "directory": str(args.dir),
                "templates": [
                    {
                        "name": name,
                        "latest": versions[-1].version,
                        "versions": [v.as_dict() for v in versions],
                    }
                    for name, versions in templates.items()
                ],
            }
        )
    else:
        print(format_templates(templates))
    return 0


def run_show(args: argparse.Namespace) -> int:
    """`strata templates show NAME[@VERSION]`: 2 for an unknown name or version."""
    templates = _load(args)
    if isinstance(templates, int):
        return templates
    name, _, version = args.ref.partition("@")
    versions = templates.get(name)
    if not versions:
        known = ", ".join(templates) or "none"
        return usage_error(f"no template {name!r} in {args.dir} (templates: {known})")
    chosen = (
        versions[-1] if not version else next((v for v in versions if v.version == version), None)
    )
    if chosen is None:
        known = ", ".join(v.version for v in versions)
        return usage_error(f"template {name!r} has no version {version!r} (versions: {known})")
    if args.json:
        print_json(chosen.as_dict())
    else:
        print(format_version(chosen))
    return 0
