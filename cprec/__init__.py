"""CPRec: all-domain continual pre-training of LLMs for recommendation."""

__version__ = "0.1.0"
