"""securefed: federated fine-tuning of language models with privacy and ownership built in."""

__version__ = "0.1.0"
