"""The atlas store: a folder of committed versions, each a TileDB-SOMA Experiment.

Contract (what ``atlas.data`` and the builds rely on):

- ``versions.current_version(store).uri`` is the Experiment to read; a version never changes.
- Measurements ``RNA``, ``protein``, ``ATAC``; X layer ``counts`` holds raw counts (float32,
  sparse, no explicit zeros). A cell has a modality iff it has a stored value in that X.
- ``ms.var`` is the feature vocabulary: ``var_id`` as given by the source; a feature keeps its
  ``soma_joinid`` forever; ``ms.metadata["species"]`` (human/mouse) and
  ``ms.metadata["id_namespace"]`` (symbol/ensembl/antibody/peak).
- ``obs``: ``obs_id`` (``"{dataset_id}:{cell_id}"``), ``cell_id``, ``dataset_id``, ``batch``,
  then one string column per label level; no label is ``""``.
- ``exp.metadata["atlas_datasets"]``: JSON list of the ingested datasets.

Entry points: :func:`atlas.store.ingest.ingest`, :func:`atlas.store.info.store_info`.
"""
