"""The compact trainer: CLIP-style patch/expression model, training loop, evaluation, embedding.

Submodules import torch; import them directly (``histmol.model.train`` etc.).
"""
