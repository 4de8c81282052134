"""mcat-ds: training and running MCAT many-to-many speech-to-text translation models."""

__version__ = "0.1.0"
