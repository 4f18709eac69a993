"""Generation: the mixed-modal engine (KV cache, modality state machine, guidance, CD-K),
its configs and events, and the saved output. See docs/generation.md."""

from mixmodal.inference.config import ContrastiveConfig, GenerationConfig, GuidanceConfig, SamplingParams
from mixmodal.inference.engine import Engine, RunningBatch
from mixmodal.inference.events import End, GenerationResult, ImageDone, ImagePreview, ImageStarted, TextDelta
from mixmodal.inference.generate import Generated, generate

__all__ = ["ContrastiveConfig", "End", "Engine", "Generated", "GenerationConfig", "GenerationResult", "GuidanceConfig",
           "ImageDone", "ImagePreview", "ImageStarted", "RunningBatch", "SamplingParams", "TextDelta", "generate"]
