"""A mkdocs hook: the command-line reference, rendered from streamavg's own argparse parsers
when the site is built, so that the page cannot drift from the code.

`docs/cli.md` holds the prose and the marker `<!-- cli-reference -->`; the build replaces
the marker with every command's usage and options. Nothing generated is committed.
"""

from __future__ import annotations

import argparse
import re

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"


def _escape(text: str) -> str:
    """Plain text as Markdown that shows it as written."""
    text = re.sub(r"([\\`*_\[\]{}#+!|])", r"\\\1", text)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _names(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    if not action.option_strings:
        return f"`{formatter._format_args(action, action.metavar or action.dest)}`"
    if action.nargs == 0:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    value = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
    return ", ".join(f"`{s} {value}`" for s in action.option_strings)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    if action.required and action.option_strings:
        text += " (required)"
    shown = action.default not in (None, False, argparse.SUPPRESS)
    if shown and "default" not in text and action.nargs != 0:
        text += f" (default: {action.default})"
    return _escape(" ".join(text.split()))


def render_command(command: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## `{command}`", "", "```text", parser.format_usage().strip(), "```", ""]
    if parser.description and command != "streamavg":  # the main one's is the page's prose
        lines += [_escape(" ".join(parser.description.split())), ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f"**{_escape(group.title or 'options')}**", ""]
        if group.description:
            lines += [_escape(" ".join(group.description.split())), ""]
        for a in actions:
            text = _help(parser, a)
            lines.append(f"- {_names(parser, a)}" + (f": {text}" if text else ""))
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    """The reference of every command, as Markdown."""
    from streamavg.cli import parsers

    return "\n".join(render_command(c, p) for c, p in parsers().items())


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs' hook
    if page.file.src_uri != PAGE:
        return markdown
    if markdown.count(MARKER) != 1:
        raise ValueError(f"docs/{PAGE} must hold {MARKER} exactly once")
    return markdown.replace(MARKER, render())
