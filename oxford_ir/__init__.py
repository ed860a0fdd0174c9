"""oxford-ir: content-based image retrieval on Oxford5k / Paris6k with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
