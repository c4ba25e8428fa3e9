"""`blockpilot ab ...` commands: A/B experiments of block-size policies (registered by blockpilot.cli)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    """Adds this group's subcommands to the top-level parser (none yet)."""
