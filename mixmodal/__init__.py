"""mixmodal: mixed-modal early-fusion models (CM3Leon, Chameleon, Transfusion)."""

from mixmodal.documents import Document, Image, Text

__version__ = "0.1.0"
__all__ = ["Document", "Image", "Text", "__version__"]
