"""Architectures: the layer-spec grammar (pure Python), presets, and the torch builder."""
