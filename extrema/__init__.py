"""ExtreMA: extreme token masking for siamese self-supervised Vision Transformers."""

__version__ = "0.1.0"
