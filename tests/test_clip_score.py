"""CLIP score with mixmodal's dual encoder: on a converted transformers CLIP it equals
torchmetrics' CLIPScore pair by pair; pairs are clamped at 0 before the mean; bad input is
refused by name."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from mixmodal.eval.clip_score import clip_score
from mixmodal.interop.hf_clip import convert_hf_clip

WORDS = ["a", "the", "red", "blue", "green", "circle", "square", "triangle", "left", "of", "small", "big"]
IMAGE_SIZE = 32
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
TEXTS = ["a red circle", "the small big triangle left of square", "blue square", "green", "a circle left of a square"]


def tiny_clip_tokenizer():
    """A CLIPTokenizer (byte-level BPE, "</w>" word ends) over letters, with merges that make
    most of WORDS single tokens. tests/test_hf_clip.py's WordLevel tokenizer.json does not do
    here: transformers 5's CLIPTokenizer.from_pretrained (what CLIPProcessor, hence torchmetrics,
    loads) rebuilds CLIP's BPE pipeline around the file's vocabulary, which turns "w12" into
    unknown tokens, so the two sides would see different ids."""
    import transformers

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab, merges = [*letters, *(c + "</w>" for c in letters)], []
    for word in WORDS:  # merge left to right: r + e -> re, re + d</w> -> red</w>
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the end token has the largest id, as in OpenAI CLIP
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


class FeaturesOnly(torch.nn.Module):
    """transformers 5's get_text_features / get_image_features return an output object
    (pooler_output = the projected features); torchmetrics 1.9 expects the tensor of 4.x and
    fails on `.norm`. CLIPScore takes a callable returning (model, processor), so this wrapper
    hands it the tensors; the numbers are CLIPModel's."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random transformers CLIP folder that both CLIPProcessor.from_pretrained and
    convert_hf_clip read: config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json),
    preprocessor_config.json."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    src = tmp_path_factory.mktemp("clip") / "hf"
    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(src)
    # shortest_edge and crop at the model's resolution: on IMAGE_SIZE images resize and crop are
    # no-ops on both sides (transformers resizes then crops, DocumentEmbedder crops then resizes)
    transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                    "width": IMAGE_SIZE}, image_mean=list(MEAN), image_std=list(STD)
                                    ).save_pretrained(src)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8, hidden_act="gelu"),
        projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    with torch.no_grad():
        for p in model.parameters():  # off the trivial init (zero biases, unit LayerNorms)
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(src)
    return src


def random_images(num: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)  # (N, 3, S, S)


def test_clip_score_matches_torchmetrics(hf_folder, tmp_path):
    import transformers

    CLIPScore = pytest.importorskip("torchmetrics.multimodal").CLIPScore
    torch.set_num_threads(1)
    embedder, _ = convert_hf_clip(hf_folder, tmp_path / "ours")
    pixels = random_images(len(TEXTS))
    images = [PIL.Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    ours = clip_score(embedder, images, TEXTS, batch_size=2)  # batches of 2, 2 and 1

    processor = transformers.CLIPProcessor.from_pretrained(hf_folder)
    theirs_ids = processor(text=TEXTS, padding=True, return_tensors="pt")
    ids, mask = embedder.tokenize(TEXTS)
    torch.testing.assert_close(mask, theirs_ids["attention_mask"])  # the same tokens on both sides
    assert (ids * mask == theirs_ids["input_ids"] * mask).all()

    metric = CLIPScore(model_name_or_path=lambda: (FeaturesOnly(transformers.CLIPModel.from_pretrained(hf_folder)),
                                                   transformers.CLIPProcessor.from_pretrained(hf_folder)))
    theirs = []
    for i in range(len(TEXTS)):  # one pair per update: compute() is then that pair's max(100 cos, 0)
        metric.reset()
        metric.update(pixels[i:i + 1], TEXTS[i:i + 1])
        theirs.append(float(metric.compute()))
    assert ours["n"] == len(TEXTS)
    np.testing.assert_allclose(ours["scores"], theirs, atol=1e-4, rtol=0)
    assert min(theirs) > 0  # no pair clamped here, so torchmetrics' clamp-the-mean agrees on the batch too
    metric.reset()
    metric.update(list(pixels), TEXTS)
    assert ours["clip_score"] == pytest.approx(float(metric.compute()), abs=1e-4)


class FixedEmbedder:
    """Unit rows at chosen angles: pair i has cosine COSINES[i]."""

    COSINES = np.array([1.0, 0.5, -0.5, 0.0])

    def __init__(self) -> None:
        self.batch_sizes = []

    def embed_images(self, images, batch_size):
        self.batch_sizes.append(batch_size)
        return np.tile(np.array([[1.0, 0.0]], np.float32), (len(images), 1))

    def embed_texts(self, texts, batch_size):
        angles = np.arccos(self.COSINES[:len(texts)])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def test_pairs_are_clamped_at_zero_before_the_mean():
    embedder = FixedEmbedder()
    images = [PIL.Image.new("RGB", (4, 4))] * 4
    result = clip_score(embedder, images, ["t"] * 4, batch_size=3)
    np.testing.assert_allclose(result["scores"], [100.0, 50.0, 0.0, 0.0], atol=1e-4)
    assert result["clip_score"] == pytest.approx(37.5, abs=1e-4)  # not max(mean(100 cos), 0) = 25
    assert result["n"] == 4 and embedder.batch_sizes == [3]
    assert clip_score(embedder, images[:1], ["t"])["clip_score"] == pytest.approx(100.0, abs=1e-4)


def test_bad_input_is_refused_by_name():
    embedder, image = FixedEmbedder(), PIL.Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        clip_score(embedder, [image, image], ["t"])
    with pytest.raises(ValueError, match="no pairs"):
        clip_score(embedder, [], [])
    with pytest.raises(ValueError, match="texts is a single str"):
        clip_score(embedder, [image], "t")
    with pytest.raises(ValueError, match=r"images\[1\] is Tensor, not a PIL image.*tensor_to_images"):
        clip_score(embedder, [image, torch.zeros(3, 4, 4)], ["t", "u"])
    with pytest.raises(ValueError, match=r"texts\[0\] is int"):
        clip_score(embedder, [image], [3])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        clip_score(embedder, [image], ["t"], batch_size=0)
