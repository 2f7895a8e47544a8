"""comp: k-fold fine-tuning of text encoders with a metadata head for classification competitions."""

__version__ = "0.1.0"
