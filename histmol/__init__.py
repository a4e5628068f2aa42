"""histmol: a registered, sharded H&E-patch / spatial-transcriptomics corpus builder.

Layers, low to high; a module imports only its own layer or lower ones (tests/test_layers.py
holds the map of every module and checks it):

- core: section, config, options, errors, genes, fingerprint, progress, counts_store
- geometry: registration, landmarks, binning, tissue, tiling, pairs, wsi, synth; and the
  platform adapters (platform_adapters/)
- storage: shards (corpus, parts, remote corpora), remote_inputs
- data, model: data (loader), model, qc, export, summary, validate
- pipeline: build (the one definition of a section build), manifest
- flows: flows/ (Prefect tasks around the pipeline's stages, the ingest flow, its server)
- app: cli, cli_options, demo, ingest_view
"""

__version__ = "0.1.0"
