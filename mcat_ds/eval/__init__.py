"""Evaluation: ``evaluate`` (``mcat evaluate``: spBLEU, chrF++, COMET, WER/CER per direction, the
paper's summary tables, the heat map, published-score comparisons)."""
