"""The ``atlas`` command line.

Commands are thin: they parse options, call one ``atlas`` function, and print. Every expected
problem (a ``StoreError`` and friends) becomes one line on stderr naming the problem and the fix,
with exit code 2 — never a traceback. Heavy libraries are imported inside the commands so that
``atlas --help`` starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from atlas.mapping.domains import describe_domains
from atlas.mapping.params import K_COARSE, K_FINE, MapParams, help_texts
from atlas.names import level_of, pred_key

_HELP = help_texts()
_DEFAULT = {name: field.default for name, field in MapParams.model_fields.items()}

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
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Ray's own logs on screen too.")] = False,
    log_file: Annotated[Path | None, typer.Option(
        help="Where Ray's own logs go (default: a new file under the temp dir, printed).")] = None,
) -> None:
    """Train, embed, index and write an atlas artifact (same code path as jobs/build_atlas.py).

    SIGINT (Ctrl-C) or SIGTERM stops the build and its local Ray; `--resume` continues it from the
    last checkpoint.
    """
    import dataclasses

    from atlas.build import build_atlas
    from atlas.stopping import stop_on_signals, stop_reason
    from atlas.train.config import ConfigError, load_build_config

    try:
        build_config = load_build_config(config)
    except ConfigError as err:
        raise fail(str(err)) from None
    if output is not None:
        build_config = dataclasses.replace(build_config, output=str(output))
    try:
        with stop_on_signals(), _ray_screen("build", verbose, log_file) as say:
            try:
                summary = build_atlas(build_config, resume=resume, overwrite=overwrite, log=say)
            finally:
                _stop_local_ray()
    except KeyboardInterrupt as interrupt:
        stop = stop_reason(interrupt)
        raise fail(f"{stop.signal_name}: the build stopped and its local Ray is shut down; nothing was published. "
                   f"Continue from the last checkpoint with: atlas build {config} --resume", stop.exit_code) from None
    typer.echo(json.dumps(dataclasses.asdict(summary), indent=2))


@contextlib.contextmanager
def _ray_screen(command: str, verbose: bool, log_file: Path | None) -> Iterator[Callable[[str], None]]:
    """Ray's own output to a log file (path printed) unless ``verbose``; yields ``say(line)`` for
    the command's progress lines, shown with a progress bar over training epochs."""
    if verbose:
        yield lambda line: typer.echo(line, err=True)
        return
    from atlas.ray_logs import BuildProgress, default_log_path, ray_output_to_file, worker_progress_to

    log = log_file or default_log_path(command)
    typer.echo(f"Ray's own logs: {log} (--verbose shows them here)", err=True)
    with ray_output_to_file(log) as console, BuildProgress(console) as progress, worker_progress_to(progress.line):
        yield progress.line


def _stop_local_ray() -> None:
    """Shut down the Ray this process started or joined (a no-op when none)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@app.command()
@user_errors
def serve(
    artifact: Annotated[Path, typer.Argument(help="Atlas artifact folder (built by `atlas build`).")],
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    token_file: Annotated[Path | None, typer.Option(
        help="File holding the bearer token clients must send (default: $ATLAS_TOKEN, else a new random "
             "token is generated and printed).")] = None,
    address: Annotated[str | None, typer.Option(
        help="Deploy on this running Ray cluster (e.g. auto) instead of starting a local Ray.")] = None,
    max_cells_per_request: Annotated[int, typer.Option(help="Most cells in one request.")] = 10_000,
    max_request_mb: Annotated[int, typer.Option(help="Largest request body in MiB.")] = 64,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Ray's and Serve's own logs on screen too.")] = False,
    log_file: Annotated[Path | None, typer.Option(
        help="Where Ray's and Serve's own logs go (default: a new file under the temp dir, printed).")] = None,
) -> None:
    """Serve ARTIFACT for query mapping (Ray Serve on a local Ray) until Ctrl-C or SIGTERM, which
    shut Serve and the local Ray down and exit 0.

    Clients: `atlas map QUERY.h5ad -o OUT.h5ad --url http://HOST:PORT` or atlas.client.AtlasClient.
    """
    import secrets
    import tempfile

    from atlas.service.app import run_service
    from atlas.service.auth import load_tokens

    args: dict[str, Any] = {"artifact": str(artifact), "max_cells_per_request": max_cells_per_request,
                            "max_request_bytes": max_request_mb << 20}
    if token_file is not None:
        load_tokens(str(token_file))  # a missing or empty file is a user error, before Ray starts
        args["token_file"] = str(token_file)
    elif os.environ.get("ATLAS_TOKEN", "").strip():
        load_tokens(None, "ATLAS_TOKEN")  # a too-short token is a user error, before Ray starts
    else:
        token = secrets.token_urlsafe(32)
        fd, path = tempfile.mkstemp(prefix="atlas-token-", text=True)  # mode 0600
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        args["token_file"] = path
        typer.echo(f"no --token-file or $ATLAS_TOKEN: generated a token (saved in {path}):\n"
                   f"  export ATLAS_TOKEN={token}", err=True)
    from atlas.stopping import stop_on_signals

    try:
        with stop_on_signals(), _ray_screen("serve", verbose, log_file) as say:
            run_service(args, host=host, port=port, address=address, log_line=say)
    except KeyboardInterrupt:
        pass  # run_service said so in one line, and shut Serve and its local Ray down


@app.command("map")
@user_errors
def map_cells(
    query: Annotated[Path, typer.Argument(help="Query cells (.h5ad) with raw counts (X or layers['counts']).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the result (.h5ad).")],
    url: Annotated[str | None, typer.Option(
        help="A mapping service (atlas serve / RayService), e.g. http://127.0.0.1:8000.")] = None,
    token: Annotated[str | None, typer.Option(help="The service's bearer token (default: $ATLAS_TOKEN).")] = None,
    token_file: Annotated[Path | None, typer.Option(help="File holding the service's bearer token.")] = None,
    atlas_dir: Annotated[Path | None, typer.Option("--atlas", help="Map offline onto this artifact folder instead.")] = None,
    levels: Annotated[str | None, typer.Option(help=_HELP["levels"] + " Comma-separated.")] = None,
    predict: Annotated[str | None, typer.Option(help=_HELP["predict"] + " Comma-separated.")] = None,
    predict_method: Annotated[str | None, typer.Option(help=_HELP["predict_method"] + " [default: knn]")] = None,
    thresholds: Annotated[str | None, typer.Option(help=_HELP["thresholds"] + " [default: calibrated]")] = None,
    k_coarse: Annotated[str | None, typer.Option(help=_HELP["k_coarse"] + f" [default: {K_COARSE}]")] = None,
    k_fine: Annotated[str | None, typer.Option(help=_HELP["k_fine"] + f" [default: {K_FINE}]")] = None,
    min_fraction: Annotated[str | None, typer.Option(help=_HELP["min_fraction"] + " [default: 0.5]")] = None,
    batch_key: Annotated[str | None, typer.Option(help=_HELP["batch_key"])] = None,
    batch: Annotated[str | None, typer.Option(help=_HELP["batch"])] = None,
    domain_statistics: Annotated[str | None, typer.Option(
        help=_HELP["domain_statistics"] + f" [default: {_DEFAULT['domain_statistics']}]")] = None,
    min_domain_cells: Annotated[str | None, typer.Option(help=_HELP["min_domain_cells"] + " [default: 100]")] = None,
    min_mix_overlap: Annotated[str | None, typer.Option(
        help=_HELP["min_mix_overlap"] + f" [default: {_DEFAULT['min_mix_overlap']}]")] = None,
    neighbors: Annotated[bool, typer.Option("--neighbors", help="Also store each cell's coarse neighbours.")] = False,
    max_cells_per_request: Annotated[int, typer.Option(help="With --url: cells per request.")] = 2000,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Map QUERY onto an atlas — served (--url) or offline (--atlas), same result — and write OUTPUT.

    OUTPUT holds the query's cells (no expression matrix): obs {level}_pred, _confidence, _unknown;
    obsm X_atlas and {modality}_pred; uns['atlas'].
    """
    import anndata as ad

    from atlas.mapping.params import MapParams, params_from_text

    if (url is None) == (atlas_dir is None):
        raise fail("give exactly one of --url (a mapping service) or --atlas (an artifact folder)")
    if atlas_dir is not None and (token or token_file):
        raise fail("--token/--token-file go with --url, not --atlas")
    if token and token_file:
        raise fail("give --token or --token-file, not both")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    if not query.is_file():
        raise FileNotFoundError(f"query file {query} not found")
    params = MapParams.parse(params_from_text({
        "levels": levels, "predict": predict, "predict_method": predict_method, "thresholds": thresholds,
        "k_coarse": k_coarse, "k_fine": k_fine, "min_fraction": min_fraction, "batch_key": batch_key, "batch": batch,
        "domain_statistics": domain_statistics,
        "min_domain_cells": min_domain_cells, "min_mix_overlap": min_mix_overlap}), return_neighbors=neighbors)
    adata = ad.read_h5ad(query)
    if url is not None:
        from atlas.client import AtlasClient

        secret = token_file.read_text().strip() if token_file is not None else token
        with AtlasClient(url, secret, max_cells_per_request=max_cells_per_request) as client:
            out = client.map(adata, params, progress=progress)
    else:
        from atlas.artifact import load_atlas
        from atlas.mapping import map_query

        if atlas_dir is None:  # impossible: exactly one of --url / --atlas was checked above
            raise fail("give exactly one of --url (a mapping service) or --atlas (an artifact folder)")
        out = map_query(adata, load_atlas(atlas_dir), params)
    output.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(output)
    summary = ", ".join(f"{level_of(c, 'unknown')} {out.obs[c].mean():.0%} unknown"
                        for c in out.obs.columns if level_of(c, "unknown"))
    typer.echo(f"mapped {out.n_obs} cells onto atlas {out.uns['atlas']['version']} ({summary}); wrote {output}")
    domains = describe_domains(out.uns["atlas"].get("query_domains") or {})
    if domains:
        typer.echo(domains)


@app.command()
@user_errors
def evaluate(
    mapped: Annotated[Path, typer.Argument(help="A mapped result (.h5ad) written by `atlas map`.")],
    query: Annotated[Path, typer.Argument(help="The query (.h5ad) that was mapped, with true labels in obs.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for report.md, metrics.json and figures.")],
    levels: Annotated[str | None, typer.Option(
        help="Label levels, comma-separated (default: every predicted level the query has labels for).")] = None,
    atlas_dir: Annotated[Path | None, typer.Option(
        "--atlas", help="The artifact folder mapped onto: adds its loss curve and thresholds.")] = None,
    batch_key: Annotated[str | None, typer.Option(help="Query obs column with each cell's batch (UMAP by batch).")] = None,
    protein_key: Annotated[str, typer.Option(help="Query obsm key with measured protein counts.")] = "protein_counts",
) -> None:
    """Score MAPPED against QUERY's true labels (and measured proteins) and write a report folder."""
    for path, what in ((mapped, "mapped result"), (query, "query")):
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} not found")
    if atlas_dir is not None and not (atlas_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"--atlas {atlas_dir}: no manifest.json there (not an atlas artifact folder)")
    import anndata as ad
    import pandas as pd

    from atlas.evaluate.report import write_report

    out = ad.read_h5ad(mapped)
    q = ad.read_h5ad(query)
    m_ids, q_ids = pd.Index(out.obs_names.astype(str)), pd.Index(q.obs_names.astype(str))
    if len(m_ids) != len(q_ids) or len(m_ids.difference(q_ids)):
        missing = m_ids.difference(q_ids)
        example = f" (e.g. {missing[0]!r} is not in the query)" if len(missing) else ""
        raise fail(f"cell ids differ: {mapped} has {len(m_ids)} cells, {query} has {len(q_ids)}, "
                   f"{len(missing)} mapped cells missing from the query{example}; give the query that was mapped")
    from atlas.mapping.params import names_from_text

    names = names_from_text(levels) if levels is not None else None
    for level in names or []:
        if pred_key(level) not in out.obs.columns:
            raise fail(f"--levels {level}: {mapped} has no '{level}_pred' column")
        if level not in q.obs.columns:
            raise fail(f"--levels {level}: {query} has no obs column '{level}' with true labels")
    if batch_key is not None and batch_key not in q.obs.columns:
        raise fail(f"--batch-key {batch_key}: {query} has no such obs column")
    manifest = None
    if atlas_dir is not None:
        from atlas.artifact import read_manifest

        manifest = read_manifest(atlas_dir)
    report = write_report(out, q, output, levels=names, batch_key=batch_key, protein_key=protein_key,
                          manifest=manifest, title=f"Mapping report: {mapped.name}")
    metrics = json.loads((output / "metrics.json").read_text(encoding="utf-8"))
    summary = ", ".join(f"{lv} accuracy {m['accuracy']:.3f}" for lv, m in metrics["levels"].items())
    if metrics.get("protein") and metrics["protein"].get("mean") is not None:
        summary += f", protein mean r {metrics['protein']['mean']:.3f}"
    typer.echo(f"evaluated {out.n_obs} cells ({summary}); wrote {report}")


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
    main()
