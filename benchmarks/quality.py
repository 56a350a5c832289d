"""Quality against the peers a user would otherwise pick, on real data, side by side in one run.

Tasks (fixed seeds, splits written to files, nothing tuned on a query split):

1. ``pbmc10k`` — CITE-seq PBMCs 80/20: hierarchical label transfer, unseen-type rejection (CD8 T
   removed), proteins from RNA: Concerto atlas vs PCA + kNN vs scANVI (scArches) vs totalVI
   (scArches) vs CellTypist.
2. ``asap_cite`` — protein panel, CITE-seq batches c1, c2 → ASAP-seq batches c3, c4, coarse and
   fine labels.
3. ``adtnorm`` — 422k cells, 9 antibodies, three whole studies held out: accuracy, macro-F1,
   build and mapping time.
4. ``mop`` — SNARE-seq RNA + ATAC: scIB integration scores of CVQVAE, its no-VQ ablation,
   Concerto multimodal / RNA-only, PCA, Harmony, scVI; ATAC prediction from RNA.
5. ``liao`` — COVID-19 lung lavage, whole transcriptome, two patients → the third: label transfer
   at two levels, Concerto vs PCA + kNN vs CellTypist vs scANVI (scArches).
6. ``bmmc_multiome`` — NeurIPS 2021 multiome starter (500 cells): the six-metric mean of the
   CVQVAE paper's code and scIB's overall, joint and modality-mixing protocols, CVQVAE vs its
   no-VQ ablation over 3 seeds vs PCA, Harmony, scVI.

    python benchmarks/quality.py                  # all six (≈ 1–1.5 h on 2 cores)
    python benchmarks/quality.py --tasks pbmc10k,adtnorm
    python benchmarks/quality.py --quick          # tiny epochs and subsamples: a smoke test

Needs the ``eval`` extra (``pip install -e '.[eval]'``; ``make`` installs it). Results:
``benchmarks/out/quality/<task>/results.{md,json}`` and ``benchmarks/out/quality/summary.md``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `atlas` is this checkout's
sys.path.insert(0, str(HERE))

TASKS = ("pbmc10k", "asap_cite", "adtnorm", "mop", "liao", "bmmc_multiome")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "quality")
    parser.add_argument("--quick", action="store_true", help="tiny epochs and subsamples (smoke test)")
    args = parser.parse_args()
    chosen = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(chosen) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    import torch

    torch.manual_seed(0)
    summary, failed = [], []
    for name in chosen:
        module = importlib.import_module(f"quality_tasks.{name}")
        out = args.out / (f"{name}_quick" if args.quick else name)
        t = time.perf_counter()
        try:
            module.run(out, quick=args.quick)
        except Exception:  # one broken peer must not hide the other tasks' results
            failed.append(name)
            (out / "error.txt").parent.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(traceback.format_exc())
            print(f"\n!! task {name} failed; traceback in {out / 'error.txt'}", file=sys.stderr, flush=True)
            continue
        summary.append((name, time.perf_counter() - t, (out / "results.md").read_text()))
    text = "\n\n".join(f"<!-- {name}: {seconds:.0f} s -->\n{md}" for name, seconds, md in summary)
    (args.out / ("summary_quick.md" if args.quick else "summary.md")).write_text(text)
    print(f"\nwritten: {args.out}/<task>/results.md for {', '.join(n for n, _, _ in summary) or 'no task'}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
