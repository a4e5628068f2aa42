"""Prefect flows: thin wiring of histmol's stages into tasks."""
