"""``roadwork backbones``: the backbone registry with one line on each entry."""

from __future__ import annotations

from roadwork_cli.cli.common import ConfigOption, DebugOption, JsonOption, console, handle_errors, print_json


@handle_errors
def command(json_output: JsonOption = False, config: ConfigOption = None, debug: DebugOption = False) -> None:
    """List the registered backbone names (timm:<name> and hf:<repo or dir> work on top of these)."""
    from rich.table import Table

    from roadwork_cli.cli.common import resolve_settings

    # The list does not depend on settings, but a bad settings file is still reported, as by every command.
    settings = resolve_settings(config, {"runtime": {"debug": debug or None}}, write_to_run=False)

    from roadwork_cli.model.backbones import list_backbones  # imports torch: only once the command runs

    described = list_backbones(with_descriptions=True)
    if json_output:
        print_json(described)
        return
    table = Table(title=f"backbones (model.backbone / --backbone; now: {settings.model.backbone})")
    table.add_column("name", no_wrap=True)
    table.add_column("what", overflow="fold")
    for name, description in described.items():
        table.add_row(name, description)
    table.caption = "also: timm:<any timm model> and hf:<repo id or local dir> (transformers AutoModel)"
    console.print(table)
