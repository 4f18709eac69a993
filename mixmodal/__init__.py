"""mixmodal: mixed-modal early-fusion models (CM3Leon, Chameleon, Transfusion)."""

__version__ = "0.1.0"
__all__ = ["Document", "Image", "Text", "generate", "load_image_tokenizer", "load_model", "__version__"]

# Modules load on first use, so `import mixmodal` (and `mixmodal --help`) stays cheap: torch for the
# functions, PIL for the document types.
_LAZY = {"Document": "mixmodal.documents", "Image": "mixmodal.documents", "Text": "mixmodal.documents",
         "load_image_tokenizer": "mixmodal.tokenizers.image", "load_model": "mixmodal.model.io",
         "generate": "mixmodal.inference.generate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixmodal' has no attribute {name!r}")
