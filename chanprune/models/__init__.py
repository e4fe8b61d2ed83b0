"""Model definitions with torchvision-compatible state_dict keys."""
