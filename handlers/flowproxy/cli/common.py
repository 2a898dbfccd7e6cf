"""What every click command shares: the settings the group built, and JSON output."""

from __future__ import annotations

import json
from typing import Any

import click

from flowproxy.settings import Settings


def settings_of(ctx: click.Context) -> Settings:
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings)
    return settings


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))
