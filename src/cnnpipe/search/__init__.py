"""The search: which configs to train (space), in what order and how far (strategies), and who wins (selection)."""
