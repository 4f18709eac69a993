"""Converters between mixmodal and public checkpoint layouts (diffusers, transformers, taming)."""
