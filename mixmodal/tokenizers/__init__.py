"""Tokenizers: byte-level BPE for text; VQ and KL-VAE for images."""
