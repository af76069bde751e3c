"""Datasets: the registry, sources and download, raw formats, prepare, prepared splits."""
