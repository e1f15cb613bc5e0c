"""Dataset sources, augmentation and the input pipeline (host side)."""
