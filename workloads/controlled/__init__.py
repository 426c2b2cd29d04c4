"""Controlled finetunes of classifiers: SFT vs RFT where the output space is small enough for exact expected gradients (paper section 4.2)."""
