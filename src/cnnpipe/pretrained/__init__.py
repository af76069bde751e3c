"""The ``weights`` stage: every torchvision model's starting weights fetched, verified and pinned in ``data/weights/``."""
