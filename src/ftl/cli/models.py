"""``ftl models import`` / ``ftl models list``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ftl.cli.base import emit, json_option
from ftl.progress import console, task_progress


@click.group()
def models() -> None:
    """Import and list base models (local HF safetensors folders under models/)."""


@models.command("import")
@click.argument("source")
@click.option("--name", help="Folder name under the models dir (default: derived from SOURCE).")
@click.option("--models-dir", type=click.Path(path_type=Path), help="Default: ./models or $FTL_MODELS_DIR.")
@click.option("--force", is_flag=True, help="Replace an existing import.")
@json_option
def models_import(source: str, name: str | None, models_dir: Path | None, force: bool, as_json: bool) -> None:
    """Import SOURCE: a built-in name (smollm2-135m), a .gguf file, an HF folder, or an HF Hub id."""
    from ftl.models import import_model

    with task_progress(f"importing {source}"):
        result = import_model(source, name=name, models_dir=models_dir, force=force)
    for warning in result.warnings:  # a GGUF matrix kept without its grid: the export quantises it again
        console.print(f"[yellow]warning:[/] {warning}")
    emit(result, as_json, _show_import)


def _show_import(result) -> None:
    verb = "already imported" if result.skipped else f"imported in {result.seconds:.1f}s"
    console.print(f"[green]✓[/] {result.name} {verb} → {result.path} "
                  f"({result.parameters / 1e6:.0f}M parameters, sha256 {result.sha256[:12]}"
                  f"{f', {result.grids} GGUF grids kept' if result.grids else ''})")


@models.command("list")
@click.option("--models-dir", type=click.Path(path_type=Path), help="Default: ./models or $FTL_MODELS_DIR.")
@json_option
def models_list(models_dir: Path | None, as_json: bool) -> None:
    """Show imported models and the built-in ones that can be imported offline."""
    from ftl.models import list_models

    emit(list_models(models_dir), as_json, _show_list)


def _show_list(found: list[dict]) -> None:
    table = Table("name", "status", "size (MB)", "parameters", "source")
    for m in found:
        params = f"{m['parameters'] / 1e6:.0f}M" if m["parameters"] else "—"
        table.add_row(m["name"], m["status"], str(m["size_mb"] or "—"), params, m["source"])
    console.print(table)
