"""``roadwork backbones``: the backbone registry with one line on each entry."""

from __future__ import annotations

from roadwork_cli.cli.common import DebugOption, JsonOption, console, handle_errors, print_json


@handle_errors
def command(json_output: JsonOption = False, debug: DebugOption = False) -> None:
    """List the registered backbone names (timm:<name> and hf:<repo or dir> work on top of these)."""
    from rich.table import Table

    from roadwork_cli.model.backbones import list_backbones  # imports torch: only once the command runs

    described = list_backbones(with_descriptions=True)
    if json_output:
        print_json(described)
        return
    table = Table(title="backbones (model.backbone / --backbone)")
    table.add_column("name", no_wrap=True)
    table.add_column("what", overflow="fold")
    for name, description in described.items():
        table.add_row(name, description)
    table.caption = "also: timm:<any timm model> and hf:<repo id or local dir> (transformers AutoModel)"
    console.print(table)
