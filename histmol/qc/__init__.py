"""Quality control of a built corpus: per-section figures and a one-page HTML report.

Submodules (import the one you need; nothing here imports matplotlib eagerly):
`histmol.qc.section_data` reads one committed section back from the corpus and renders its
background image (from the WSI when given, else a mosaic of the stored patches);
`histmol.qc.figures` draws the section's QC PNGs; `histmol.qc.report` writes the corpus page.
"""
