"""chanprune: reconstruction-based channel pruning for PyTorch."""
