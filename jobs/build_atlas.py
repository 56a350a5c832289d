"""Build an atlas on a Ray cluster.

    ray job submit --working-dir . -- python jobs/build_atlas.py --config build.yaml

A thin shell over ``atlas.build.build_atlas``: ``atlas build build.yaml`` runs the same code.
"""

import argparse
import sys

from atlas.build import build_atlas
from atlas.train.config import ConfigError, load_build_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build an atlas (train, embed, index, artifact) on Ray.")
    parser.add_argument("--config", required=True, help="build config YAML")
    parser.add_argument("--output", "-o", help="artifact folder (overrides the config's output)")
    parser.add_argument("--resume", action="store_true", help="continue the newest interrupted run of this build")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact at the output")
    args = parser.parse_args(argv)
    try:
        build = load_build_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output:
        import dataclasses

        build = dataclasses.replace(build, output=args.output)
    summary = build_atlas(build, resume=args.resume, overwrite=args.overwrite)
    print(f"atlas {summary.atlas_version}: {summary.cells:,} cells -> {summary.artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
