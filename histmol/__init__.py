"""histmol: a registered, sharded H&E-patch / spatial-transcriptomics corpus builder."""

__version__ = "0.1.0"
