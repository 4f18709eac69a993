"""mixmodal: mixed-modal early-fusion models (CM3Leon, Chameleon, Transfusion)."""

from mixmodal.documents import Document, Image, Text

__version__ = "0.1.0"
__all__ = ["Document", "Image", "Text", "generate", "load_image_tokenizer", "load_model", "__version__"]

# Heavy modules (torch) load on first use, so `import mixmodal` stays cheap.
_LAZY = {"load_image_tokenizer": "mixmodal.tokenizers.image", "load_model": "mixmodal.model.io",
         "generate": "mixmodal.inference.generate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixmodal' has no attribute {name!r}")
