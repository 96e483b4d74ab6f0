"""diffit: train, sample, evaluate and study DiffiT (arXiv 2312.02139) from one command line."""

__version__ = "0.1.0"
