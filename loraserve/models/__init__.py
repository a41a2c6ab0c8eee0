"""Model architectures: one module per family, picked by `architectures[0]` (models/registry.py)."""
