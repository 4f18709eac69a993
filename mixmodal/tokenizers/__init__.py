"""Tokenizers: byte-level BPE for text (text.py); VQ (vq.py) and KL-VAE (vae.py) for images,
sharing the conv trunk in trunk.py, saved and loaded by image.py."""
