"""The ``atlas`` command line.

Commands are thin: they parse options, call one ``atlas`` function, and print. Every expected
problem (a ``StoreError`` and friends) becomes one line on stderr naming the problem and the fix,
with exit code 2 — never a traceback. Heavy libraries are imported inside the commands so that
``atlas --help`` starts fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    name="atlas",
    help="Single-cell reference atlases on Ray: ingest, build, serve, map.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print one ``error: …`` line on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn the library's user-facing errors into one stderr line and a non-zero exit.

    ``ATLAS_DEBUG=1`` re-raises instead, to see the traceback of an unexpected error.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from atlas.errors import AtlasError

        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except (AtlasError, FileExistsError, FileNotFoundError) as e:
            raise fail(str(e)) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was committed", 130) from None
        except Exception as e:  # noqa: BLE001 - a bug must still not look like a crash dump
            if os.environ.get("ATLAS_DEBUG") == "1":
                raise
            raise fail(f"unexpected {type(e).__name__}: {e} (rerun with ATLAS_DEBUG=1 for the traceback)",
                       EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def parse_pairs(values: list[str] | None, option: str, meaning: str) -> dict[str, str]:
    """``["a=b", "c=d"]`` → ``{"a": "b", "c": "d"}``; a malformed item is a user error."""
    from atlas.store.versions import StoreError

    pairs: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise StoreError(f"{option} {item!r}: expected {meaning}")
        if key.strip() in pairs:
            raise StoreError(f"{option}: '{key.strip()}' is given twice; give each once")
        pairs[key.strip()] = value.strip()
    return pairs


@app.callback()
def _root() -> None:
    """Single-cell reference atlases on Ray: ingest, build, serve, map."""


@app.command()
@user_errors
def ingest(
    store: Annotated[Path, typer.Argument(help="Atlas store folder (created by the first ingest).")],
    source: Annotated[Path, typer.Argument(help=".h5ad, AnnData-zarr folder, 10x .h5 or 10x mtx folder.")],
    modality: Annotated[str, typer.Option(help="What SOURCE's X holds: rna, protein or atac.")] = "rna",
    paired: Annotated[list[str] | None, typer.Option(
        help="Another modality of the same cells in a separate file: MODALITY=FILE (e.g. atac=atac.h5ad).")] = None,
    obsm_modality: Annotated[list[str] | None, typer.Option(
        help="A modality in SOURCE's obsm: MODALITY=KEY (e.g. protein=protein_counts).")] = None,
    dataset_id: Annotated[str | None, typer.Option(help="Dataset name in the store (default: file name).")] = None,
    batch_key: Annotated[str | None, typer.Option(help="obs column with each cell's batch.")] = None,
    label_key: Annotated[list[str] | None, typer.Option(
        help="A label level: LEVEL=COLUMN (e.g. cell_type_l1=coarse_cluster); repeat for more levels.")] = None,
    unlabeled: Annotated[list[str] | None, typer.Option(
        help="A label value meaning 'no label' (e.g. undefined); stored as missing. Repeatable.")] = None,
    species: Annotated[str | None, typer.Option(help="human or mouse (default: inferred from gene ids).")] = None,
    allow_normalized: Annotated[bool, typer.Option(
        "--allow-normalized", help="Accept non-integer/negative values (the store expects raw counts).")] = False,
    refuse_empty_cells: Annotated[bool, typer.Option(
        "--refuse-empty-cells", help="Refuse cells with zero counts instead of dropping them.")] = False,
    chunk_size: Annotated[int, typer.Option(help="Most cells read and written at once.")] = 50_000,
    tenx_feature_ids: Annotated[str, typer.Option(
        "--10x-feature-ids", help="For 10x sources: use the feature 'id' (Ensembl) or 'name' (symbol).")] = "id",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Validate SOURCE and append it to STORE as one new version (all its modalities)."""
    from dataclasses import asdict

    from atlas.store.ingest import ingest as run_ingest

    summary = run_ingest(
        store,
        source,
        modality=modality,
        paired=parse_pairs(paired, "--paired", "MODALITY=FILE, e.g. atac=atac.h5ad"),
        obsm_modalities=parse_pairs(obsm_modality, "--obsm-modality", "MODALITY=KEY, e.g. protein=protein_counts"),
        dataset_id=dataset_id,
        batch_key=batch_key,
        label_keys=parse_pairs(label_key, "--label-key", "LEVEL=COLUMN, e.g. cell_type_l1=cell_type"),
        unlabeled=tuple(unlabeled or ()),
        species=species,
        allow_normalized=allow_normalized,
        drop_empty_cells=not refuse_empty_cells,
        chunk_size=chunk_size,
        tenx_feature_ids=tenx_feature_ids,
        progress=progress and not as_json,
        log=None if as_json else (lambda m: typer.echo(f"note: {m}", err=True)),
    )
    if as_json:
        typer.echo(json.dumps(asdict(summary), indent=2))
        return
    per_ms = ", ".join(
        f"{ms} {summary.cells_per_measurement[ms]} cells × {summary.features[ms]} features "
        f"(+{summary.new_features[ms]} new, vocabulary {summary.vocabulary_size[ms]})"
        for ms in summary.features
    )
    typer.echo(f"ingested {summary.dataset_id}: {summary.cells_ingested} cells"
               f" ({summary.cells_dropped_empty} empty cells dropped); {per_ms}; "
               f"{store} is now at version {summary.version}")


@app.command()
@user_errors
def info(
    store: Annotated[Path, typer.Argument(help="Atlas store folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    version: Annotated[int | None, typer.Option(help="Describe this committed version (default: current).")] = None,
) -> None:
    """Cells, datasets, modalities, features and versions of an atlas store."""
    from atlas.store.info import store_info

    summary = store_info(store, version)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{summary['store']}[/bold]: {summary['cells']} cells, version {summary['version']} "
                  f"of {len(summary['versions'])}; label levels: {', '.join(summary['label_levels']) or 'none'}")
    ms_table = Table("measurement", "features", "cells", "species", "ids", title="measurements")
    for name, m in summary["measurements"].items():
        ms_table.add_row(name, str(m["features"]), str(m["cells"]), str(m["species"]), str(m["id_namespace"]))
    console.print(ms_table)
    ds_table = Table("dataset", "cells", "modalities", "species", "ingested", title="datasets")
    for d in summary["datasets"]:
        mods = ", ".join(f"{k} {v}" for k, v in d["modalities"].items())
        ds_table.add_row(d["dataset_id"], str(d["cells"]), mods, str(d["species"]), str(d["ingested_at"]))
    console.print(ds_table)
    v_table = Table("version", "committed", "change", "cells", title="versions")
    for v in summary["versions"]:
        v_table.add_row(f"{v['version']}{' (current)' if v['current'] else ''}", str(v["committed_at"]),
                        v["change"], str(v["cells"]))
    console.print(v_table)


@app.command()
@user_errors
def build(
    config: Annotated[Path, typer.Argument(help="Build config YAML (see README).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Artifact folder (overrides the config).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest interrupted run of this build.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact.")] = False,
) -> None:
    """Train, embed, index and write an atlas artifact (same code path as jobs/build_atlas.py)."""
    import dataclasses

    from atlas.build import build_atlas
    from atlas.train.config import ConfigError, load_build_config

    try:
        build_config = load_build_config(config)
    except ConfigError as err:
        raise fail(str(err)) from None
    if output is not None:
        build_config = dataclasses.replace(build_config, output=str(output))
    summary = build_atlas(build_config, resume=resume, overwrite=overwrite,
                          log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(dataclasses.asdict(summary), indent=2))


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's store, artifact and logs.")] = Path("demo_out"),
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 2,
) -> None:
    """What `make demo` runs: real data → store → `ray job submit` build → atlas summary."""
    from atlas.demo import run_demo

    run_demo(out, epochs=epochs)


def main() -> None:
    """Console entry point (``atlas``)."""
    app()


if __name__ == "__main__":
    sys.exit(main())
