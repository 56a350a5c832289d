"""Choose the vote's fine k and rarity balance on the *reference* only (never a scored query).

    python benchmarks/validate_label_space.py      # builds the validation atlases (once)
    python benchmarks/validate_vote.py [--atlases benchmarks/out/validate_label_space]

The validation splits and atlases are ``benchmarks/validate_label_space.py``'s (pbmc10k: task 1's
reference split again 80/20; liao2020: one reference patient's atlas, the other patient mapped with
its batch given), the atlases that vote in the profile space. Each validation set is mapped again
for every pair of ``k_fine`` (neighbours in a fine shard) and vote balance (each neighbour's vote
× ``(n_c / n_max) ** -power`` of its label's reference cells; set on the loaded atlas in memory,
the artifact is not changed); ``k_coarse`` 25, no rejection. The balance weights every level's vote;
``k_fine`` only the deeper levels'. Writes ``results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

POWERS = (0.0, 0.25, 0.5, 1.0)
K_FINE = (5, 10, 25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atlases", type=Path, default=HERE / "out" / "validate_label_space")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "validate_vote")
    args = parser.parse_args()

    import validate_label_space
    from sklearn.metrics import f1_score

    from atlas.artifact import load_atlas
    from atlas.mapping.query import map_query

    args.out.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for task in ("pbmc10k", "liao"):
        adata, train, levels, _, _, map_kwargs, unlabeled = validate_label_space.TASKS[task]()
        validation = adata[~train].copy()
        validation.obsm.pop("protein_counts", None)
        truth = {lv: validation.obs[lv].astype(str).to_numpy() for lv in levels}
        atlas = load_atlas(args.atlases / task / "artifacts" / "profiles")
        balance = atlas.manifest["mapping"]["vote_balance"]
        for power in POWERS:
            balance["power"] = power  # in memory: what mapping reads (atlas.mapping.query.vote_balance)
            for k_fine in K_FINE:
                mapped = map_query(validation, atlas, k_coarse=25, k_fine=k_fine, thresholds=None, **map_kwargs)
                scores = []
                for lv in levels:
                    ok = ~np.isin(truth[lv], [*unlabeled, "", "nan"])
                    pred = mapped.obs[f"{lv}_pred"].astype(str).to_numpy()[ok]
                    scores.append({"accuracy": float((pred == truth[lv][ok]).mean()),
                                   "macro_f1": float(f1_score(truth[lv][ok], pred, average="macro"))})
                results.append({"task": task, "power": power, "k_fine": k_fine, "levels": levels, "scores": scores})
                rows.append(f"| {task} ({validation.n_obs:,} cells) | {power:g} | {k_fine} | "
                            + " | ".join(f"{s['accuracy']:.3f} / {s['macro_f1']:.3f}" for s in scores) + " |")
                print(rows[-1], flush=True)
    table = "\n".join(["| split | vote balance | k_fine | level 1 acc / macro-F1 | level 2 acc / macro-F1 |",
                       "| --- | ---: | ---: | ---: | ---: |", *rows])
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
