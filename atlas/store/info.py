"""``atlas info``: what a store holds, read from its current (or a given) version."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atlas.store import versions
from atlas.store.ingest import DATASETS_KEY, OBS_FIXED, X_LAYER


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def store_info(store: str | os.PathLike, version: int | None = None) -> dict[str, Any]:
    """Summarise a store: cells, datasets (cells per dataset and modality), measurements
    (features, species, id namespace), label levels and the committed versions.

    Cheap: reads the commit record, the Experiment's metadata and array shapes, never the counts.
    Raises StoreError when ``store`` is not an atlas store.
    """
    import tiledbsoma as soma

    record = versions.read_record(store)
    current = versions.current_version(store, version)
    with soma.Experiment.open(current.uri) as exp:
        datasets = json.loads(exp.metadata.get(DATASETS_KEY, "[]"))
        measurements = {}
        for name in sorted(exp.ms.keys()):
            ms = exp.ms[name]
            measurements[name] = {
                "features": int(ms.var.count),
                "species": ms.metadata.get("species"),
                "id_namespace": ms.metadata.get("id_namespace"),
                "layers": sorted(ms.X.keys()),
                "cells": sum(d["measurements"].get(name, 0) for d in datasets),
            }
        n_cells = int(exp.obs.count)
        label_levels = [c for c in exp.obs.schema.names if c not in OBS_FIXED and c != "soma_joinid"]
    return {
        "store": str(Path(store)),
        "version": current.version,
        "uri": current.uri,
        "cells": n_cells,
        "x_layer": X_LAYER,
        "datasets": [
            {
                "dataset_id": d["dataset_id"],
                "cells": d["cells"],
                "modalities": d["measurements"],
                "species": d.get("species"),
                "source": d.get("source"),
                "batch_key": d.get("batch_key"),
                "label_keys": d.get("label_keys", {}),
                "values": d.get("values", "counts"),
                "ingested_at": _iso(d.get("ingested_at")),
            }
            for d in datasets
        ],
        "measurements": measurements,
        "label_levels": label_levels,
        "versions": [
            {
                "version": v["version"],
                "name": v["name"],
                "committed_at": _iso(v.get("committed_at")),
                "dataset_id": v.get("dataset_id"),
                # What the version added: a dataset (ingest) or an embedding written by a build.
                "change": (f"embedding {v['modality']}.obsm['{v['embedding']}']" if v.get("action") == "embedding"
                           else f"ingest {v.get('dataset_id')}"),
                "cells": v.get("cells"),
                "current": v["version"] == record["current"],
            }
            for v in record["history"]
        ],
    }
