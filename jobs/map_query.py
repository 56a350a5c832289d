"""Map a large query onto an atlas offline, with Ray Data (no mapping service needed).

    ray job submit --working-dir . -- python jobs/map_query.py \\
        --atlas ARTIFACT_DIR --query QUERY.h5ad --output OUT_DIR [--levels a,b] [--predict protein]

A thin shell over ``atlas.mapping.offline.map_offline``. It joins the cluster in ``RAY_ADDRESS``
(as a submitted job does) or starts a local Ray. ``OUT_DIR/cells/*.parquet`` holds one row per
cell; ``OUT_DIR/summary.json`` the counts; ``atlas.mapping.offline.read_mapping(OUT_DIR)`` reads
it back as an AnnData.
"""

import argparse
import sys

from atlas.errors import AtlasError
from atlas.mapping.offline import map_offline
from atlas.mapping.params import MapParams, help_texts, params_from_text

# Options of the offline runner itself; the mapping parameters come from MapParams.
_RUNNER = ("atlas", "query", "output", "actors", "cpus_per_actor", "block_cells", "batch_size", "gpu", "overwrite",
           "no_progress")


def parser() -> argparse.ArgumentParser:
    """The job's options: the runner's, and one ``--name`` per mapping parameter, read as
    ``atlas map`` and the service's query string read them (one text parser)."""
    parser = argparse.ArgumentParser(description="Map a query (.h5ad, AnnData-zarr or atlas store) onto an atlas "
                                                 "with Ray Data; write Parquet and a summary.")
    parser.add_argument("--atlas", required=True, help="atlas artifact folder")
    parser.add_argument("--query", required=True, help="query .h5ad file, AnnData-zarr folder or atlas store")
    parser.add_argument("--output", "-o", required=True, help="output folder (cells/*.parquet, summary.json)")
    for name, text in help_texts().items():
        if name == "return_neighbors":  # the offline mapper's Parquet has no neighbour columns
            continue
        default = MapParams.model_fields[name].default
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar="TEXT",
                            help=text if default is None else f"{text} (default: {default})")
    parser.add_argument("--actors", type=int, default=1, help="mapping actors (each loads the atlas once)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--block-cells", type=int, default=8192, help="cells per read task / mapping call")
    parser.add_argument("--batch-size", type=int, default=1024, help="cells per model forward pass")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def params_of(args: argparse.Namespace) -> MapParams:
    """The mapping parameters the command line gave (raises MappingError, an AtlasError)."""
    text = {k: v for k, v in vars(args).items() if k not in _RUNNER}
    return MapParams.parse(params_from_text(text))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        summary = map_offline(
            args.query, args.atlas, args.output, params_of(args), block_cells=args.block_cells, actors=args.actors,
            cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size, use_gpu=args.gpu,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    except AtlasError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"mapped {summary.cells:,} cells in {summary.seconds:.1f} s ({summary.cells_per_s:,.0f} cells/s) "
          f"-> {summary.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
