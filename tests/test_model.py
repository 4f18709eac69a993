"""The backbone: the fast attention paths against the plain dense reference, RoPE, the two
norm orderings, the latent (Transfusion) path, and bidirectional attention inside images."""

from __future__ import annotations

import pytest
import torch

from mixmodal.model.fusion import FusionModel, ImageConfig, ModelConfig
from mixmodal.model.masks import BAND, AttentionMask, banded_attention, dense_mask, reference_attention
from mixmodal.model.transformer import Rotary, Transformer, TransformerConfig, apply_rotary, grid_positions

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU, by design


def random_layout(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """document_ids / image_ids [B, T]: a few documents per row, image blocks inside them, and
    trailing padding (-1) on some rows."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.full((batch, length), -1)
    images = torch.full((batch, length), -1)
    next_image = 0
    for b in range(batch):
        t, doc = 0, 0
        end = length - int(torch.randint(0, 8, (1,), generator=g)) * (b % 2)  # odd rows end in padding
        while t < end:
            n = min(int(torch.randint(3, 15, (1,), generator=g)), end - t)
            docs[b, t:t + n] = doc
            if n >= 6 and torch.rand(1, generator=g) < 0.7:  # an image block strictly inside the document
                start = t + int(torch.randint(1, n - 4, (1,), generator=g))
                size = int(torch.randint(2, t + n - start + 1, (1,), generator=g))
                images[b, start:start + size] = next_image
                next_image += 1
            t, doc = t + n, doc + 1
    return docs, images


def qkv(batch, heads, kv_heads, length, dim=16, seed=0, key_length=None):
    g = torch.Generator().manual_seed(seed)
    kl = key_length or length
    return (torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, kv_heads, kl, dim, generator=g),
            torch.randn(batch, kv_heads, kl, dim, generator=g))


# --- masks ----------------------------------------------------------------------------------

def test_dense_mask_reference_by_hand():
    docs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    images = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],  # image 0 sees its later position
                             [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0],  # a new document starts fresh
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)  # padding sees itself only
    assert torch.equal(dense_mask(docs, images)[0], expected)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "auto"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_fast_paths_match_the_reference(backend, heads, kv_heads):
    for seed in range(3):
        docs, images = random_layout(3, 37, seed)
        q, k, v = qkv(3, heads, kv_heads, 37, seed=seed)
        expected = reference_attention(q, k, v, dense_mask(docs, images))
        mask = AttentionMask.build(docs, images, backend=backend)
        assert mask.kind == {"sdpa": "dense", "flex": "flex", "auto": "dense"}[backend]
        out = mask.attend(q, k, v)
        assert torch.isfinite(out).all()
        assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_one_document_without_images_takes_the_causal_kernel(backend):
    docs = torch.zeros(2, 21, dtype=torch.long)
    q, k, v = qkv(2, 4, 2, 21)
    mask = AttentionMask.build(docs, backend=backend)
    assert mask.kind == "causal"
    expected = reference_attention(q, k, v, dense_mask(docs, torch.full_like(docs, -1)))
    assert (mask.attend(q, k, v) - expected).abs().max() <= 1e-5


def test_kv_suffix_matches_the_rows_of_the_full_attention():
    docs, images = random_layout(2, 30, seed=5)
    q, k, v = qkv(2, 4, 2, 30, seed=5)
    full = reference_attention(q, k, v, dense_mask(docs, images))
    offset = 22
    mask = AttentionMask.build(docs[:, offset:], images[:, offset:], key_document_ids=docs, key_image_ids=images,
                               query_offset=offset, backend="sdpa")
    assert mask.kind == "dense"
    assert (mask.attend(q[:, :, offset:], k, v) - full[:, :, offset:]).abs().max() <= 1e-5
    one_step = AttentionMask.build(docs[:, -1:], images[:, -1:], key_document_ids=docs, key_image_ids=images,
                                   query_offset=29, backend="auto")
    assert (one_step.attend(q[:, :, -1:], k, v) - full[:, :, -1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_banded_attention_matches_the_reference_with_its_gradients(packed):
    """The compiled CPU training path: bands of 64 queries, a last band shorter, GQA, packed documents
    with padding; outputs and gradients of q, k and v as the float32 reference gives them."""
    length = 2 * BAND + 21
    docs = torch.zeros(2, length, dtype=torch.long)
    if packed:
        docs, _ = random_layout(2, length, seed=3)
    images = torch.full_like(docs, -1)
    mask = AttentionMask.build(docs, images, backend="sdpa")
    assert (mask.kind, mask.causal_band) == (("dense", True) if packed else ("causal", False))
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 2, length, seed=1))
    expected = reference_attention(q, k, v, dense_mask(docs, images))
    out = banded_attention(q, k, v, mask.dense)
    assert (out - expected).abs().max() <= 1e-5
    grads = torch.autograd.grad((out * expected.detach()).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * expected.detach()).sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        assert (g - e).abs().max() <= 1e-4


def test_only_a_compiled_cpu_training_step_with_a_causal_mask_takes_the_bands():
    length = 2 * BAND
    docs, images = random_layout(1, length, seed=2)
    q, k, v = qkv(1, 4, 4, length)
    packed = AttentionMask.build(docs, torch.full_like(docs, -1), backend="sdpa")
    with_images = AttentionMask.build(docs, images, backend="sdpa")
    assert not with_images.causal_band  # a later key inside an image block: not in the band
    decide = torch.compile(lambda mask, q, k: torch.tensor(mask._banded(q, k, 0.0)), backend="eager", fullgraph=True)
    grad_q = q.clone().requires_grad_()
    assert decide(packed, grad_q, k) and not packed._banded(grad_q, k, 0.0)  # compiled only
    assert not decide(packed, q, k)  # inference: SDPA's forward is as fast
    assert not decide(with_images, grad_q, k)
    short = AttentionMask.build(docs[:, :BAND], torch.full_like(docs[:, :BAND], -1), backend="sdpa")
    assert not decide(short, grad_q[:, :, :BAND], k[:, :, :BAND])  # one band: nothing to skip
    traced = torch.compile(lambda q, k, v: packed.attend(q, k, v), backend="eager", fullgraph=True)
    expected = reference_attention(grad_q, k, v, dense_mask(docs, torch.full_like(docs, -1)))
    assert (traced(grad_q, k, v) - expected).abs().max() <= 1e-5


# --- transformer ------------------------------------------------------------------------------

def rope_scorer(head_dim: int):
    """score(query position, key position): one random query and key's dot product after RoPE; a position is
    an int or a [sequence, row, column] list."""
    rotary = Rotary(head_dim, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def score(m, n):
        cq, sq = rotary(torch.tensor([[m]]))
        ck, sk = rotary(torch.tensor([[n]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    return score


def test_rope_scores_depend_only_on_relative_position():
    score = rope_scorer(16)

    for m, n, shift in [(5, 2, 7), (0, 0, 100), (3, 9, 41)]:
        assert torch.allclose(score(m, n), score(m + shift, n + shift), atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_grid_positions_give_each_patch_its_row_and_column_and_text_its_position():
    positions = torch.arange(10).expand(2, 10)
    index = torch.stack([3 + torch.arange(4), 10 + 5 + torch.arange(4)])  # 2 x 2 images at row 0 pos 3, row 1 pos 5
    grid = grid_positions(positions, index, side=2)
    assert grid.shape == (2, 10, 3)
    assert grid[0, 3:7].tolist() == [[3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4]]  # (s, s + r, s + c)
    assert grid[1, 5:9].tolist() == [[5, 5, 5], [5, 5, 6], [5, 6, 5], [5, 6, 6]]
    text = torch.ones(2, 10, dtype=torch.bool)
    text[0, 3:7] = text[1, 5:9] = False
    assert torch.equal(grid[text], positions[text][:, None].expand(-1, 3))
    rotary = Rotary(12, theta=10000.0)
    for a, b in zip(rotary(positions), rotary(positions[..., None].expand(2, 10, 3))):
        torch.testing.assert_close(a, b)  # three equal axes: exactly the 1-D rotation

    # a score depends on the offset along each axis, and the row and column axes are not interchangeable
    score = rope_scorer(12)
    assert torch.allclose(score([9, 9, 9], [3, 4, 4]), score([10, 10, 10], [4, 5, 5]), atol=1e-4)  # relative
    assert not torch.allclose(score([9, 9, 9], [3, 3, 4]), score([9, 9, 9], [3, 4, 3]), atol=1e-3)  # axes differ


def test_rope_2d_moves_only_what_reads_an_image():
    def model(rope_2d):
        torch.manual_seed(0)
        return FusionModel(ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=32, num_layers=2, num_heads=2),
                                       image=ImageConfig(mode="latents", latent_channels=4, grid_size=3, patch_size=1,
                                                         rope_2d=rope_2d))).eval()

    flat, grid = model(False), model(True)
    ids = torch.randint(0, 40, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(flat(ids).logits, grid(ids).logits)  # text only: the 1-D rotation
        image_ids = torch.full((1, 16), -1)
        image_ids[0, 3:12] = 0
        kwargs = dict(image_ids=image_ids, image_latents=torch.randn(1, 4, 3, 3), image_times=torch.tensor([0.5]),
                      image_index=(3 + torch.arange(9))[None])
        a, b = flat(ids, **kwargs).logits, grid(ids, **kwargs).logits
    assert torch.equal(a[0, :3], b[0, :3]) and (a[0, 12:] - b[0, 12:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="image.rope_2d is for image.mode=latents"):
        ImageConfig(rope_2d=True)


def tiny_transformer(seed=0, **fields) -> Transformer:
    torch.manual_seed(seed)
    config = TransformerConfig(dim=32, num_layers=2, num_heads=4, num_kv_heads=2, **fields)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_transformer_is_invariant_to_shifting_all_positions():
    model = tiny_transformer()
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, 12)
    mask = AttentionMask.build(torch.zeros(2, 12, dtype=torch.long))
    with torch.no_grad():
        assert (model(x, positions, mask) - model(x, positions + 13, mask)).abs().max() <= 1e-4


def test_swin_norm_and_pre_norm_differ_with_the_same_weights():
    pre, swin = tiny_transformer(), tiny_transformer(swin_norm=True)
    swin.load_state_dict(pre.state_dict())  # same names, same shapes
    x = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(2))
    positions, mask = torch.arange(10)[None], AttentionMask.build(torch.zeros(1, 10, dtype=torch.long))
    with torch.no_grad():
        a, b = pre(x, positions, mask), swin(x, positions, mask)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-2


def test_bidirectional_image_block_is_order_independent():
    """Inside a bidirectional block, permuting the positions (tokens with their RoPE positions)
    permutes the outputs: no position is privileged by order. Causal attention is not."""
    model = tiny_transformer()
    t, block = 14, torch.arange(3, 11)
    x = torch.randn(1, t, 32, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(t)[None]
    docs = torch.zeros(1, t, dtype=torch.long)
    images = torch.full((1, t), -1)
    images[0, block] = 0
    order = torch.arange(t)
    order[block] = block[torch.randperm(len(block), generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        for image_ids, equivariant in [(images, True), (None, False)]:
            mask = AttentionMask.build(docs, image_ids)
            out = model(x, positions, mask)
            permuted = model(x[:, order], positions[:, order], mask)
            close = (permuted - out[:, order]).abs().max() <= 1e-4
            assert bool(close) == equivariant
            assert torch.allclose(permuted[:, :3], out[:, :3], atol=1e-5)  # text before the image: unaffected


# --- the fusion model -------------------------------------------------------------------------

@pytest.mark.parametrize("patchify", ["linear", "mlp", "unet"])
def test_latent_mode_shapes_and_gradients(patchify):
    config = ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4),
                         image=ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=2,
                                           patchify=patchify, unet_channels=16))
    torch.manual_seed(0)
    model = FusionModel(config)
    b, t, p = 2, 40, config.image.positions_per_image
    assert p == 16
    ids = torch.randint(0, 40, (b, t))
    starts = [(0, 3), (1, 1), (1, 20)]  # (row, first position) of each image
    image_index = torch.stack([row * t + start + torch.arange(p) for row, start in starts])  # [N, P]
    image_ids = torch.full((b * t,), -1)
    image_ids[image_index.flatten()] = torch.arange(len(starts)).repeat_interleave(p)
    latents = torch.randn(len(starts), 4, 8, 8)
    times = torch.rand(len(starts))
    first = model(ids, image_ids=image_ids.view(b, t), image_latents=latents, image_times=times, image_index=image_index)
    assert torch.equal(first.image_prediction, torch.zeros_like(latents))  # every patchify starts at 0 (DiT)
    # the output projection starts at zero (DiT); move it so the diffusion loss reaches patch_in
    with torch.no_grad():
        for param in model.patch_out.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    out = model(ids, image_ids=image_ids.view(b, t), image_latents=latents, image_times=times, image_index=image_index)
    assert out.logits.shape == (b, t, config.vocab.size) and out.hidden_states.shape == (b, t, 32)
    assert out.image_prediction.shape == latents.shape
    out.image_prediction.square().mean().backward()
    for name in ("patch_in", "patch_out", "time_embed"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert model.image_rows.grad.abs().sum() > 0 and model.image_cols.grad.abs().sum() > 0


@pytest.mark.parametrize("patchify", ["linear", "mlp"])
def test_a_time_per_patch_is_a_time_per_image_when_they_agree_and_moves_only_its_own_patch_in(patchify):
    config = ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=32, num_layers=2, num_heads=4),
                         image=ImageConfig(mode="latents", latent_channels=4, grid_size=4, patch_size=2,
                                           patchify=patchify))
    torch.manual_seed(0)
    model = FusionModel(config)
    with torch.no_grad():
        for param in model.patch_out.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    ids = torch.randint(0, 40, (1, 12))
    index = (3 + torch.arange(4))[None]
    image_ids = torch.full((1, 12), -1)
    image_ids[0, 3:7] = 0
    latents = torch.randn(1, 4, 4, 4)

    def run(times):
        return model(ids, image_ids=image_ids, image_latents=latents, image_times=times, image_index=index)

    per_image = run(torch.tensor([0.3]))
    per_patch = run(torch.full((1, 4), 0.3))
    torch.testing.assert_close(per_patch.image_prediction, per_image.image_prediction, atol=1e-5, rtol=1e-5)
    other = run(torch.tensor([[0.3, 0.0, 0.3, 0.3]]))  # patch 1 told it is clean
    assert (other.image_prediction - per_image.image_prediction).abs().max() > 1e-3
    assert torch.equal(other.logits[0, :3], per_image.logits[0, :3])  # text before the image cannot see it
    unet = FusionModel(ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=32, num_layers=1, num_heads=2),
                                   image=ImageConfig(mode="latents", latent_channels=4, grid_size=4, patch_size=2,
                                                     patchify="unet", unet_channels=16)))
    with pytest.raises(ValueError, match="per-patch image_times"):
        unet(ids, image_ids=image_ids, image_latents=latents, image_times=torch.full((1, 4), 0.3), image_index=index)


def test_patchify_mlp_is_not_linear_in_the_state_and_names_are_checked():
    config = ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=32, num_layers=1, num_heads=2),
                         image=ImageConfig(mode="latents", latent_channels=4, grid_size=4, patch_size=1,
                                           patchify="mlp"))
    torch.manual_seed(0)
    out = FusionModel(config).patch_out
    torch.nn.init.normal_(out.proj[-1].weight, 0.0, 0.1)
    h = torch.randn(1, 16, 32)
    assert not torch.allclose(out(-h, None, None), -out(h, None, None), atol=1e-4)  # a linear map would be odd
    with pytest.raises(ValueError, match="image.patchify must be 'linear', 'mlp' or 'unet'"):
        ImageConfig(mode="latents", patchify="conv")


def test_position_std_sets_the_scale_of_the_patch_position_embeddings():
    def rows(**image):
        torch.manual_seed(0)
        config = ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=64, num_layers=1, num_heads=2),
                             image=ImageConfig(mode="latents", latent_channels=4, grid_size=8, patch_size=1, **image))
        return FusionModel(config).image_rows

    assert abs(rows().std().item() - 0.02) < 0.004  # the transformer's init_std
    assert abs(rows(position_std=0.7).std().item() - 0.7) < 0.1
    with pytest.raises(ValueError, match="image.position_std must be >= 0"):
        ImageConfig(mode="latents", position_std=-1.0)


def test_token_mode_rejects_latents():
    model = FusionModel(ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=32, num_layers=1, num_heads=2),
                                    image=ImageConfig(num_codes=16, grid_size=4)))
    with pytest.raises(ValueError, match="token-mode model"):
        model(torch.zeros(1, 4, dtype=torch.long), image_latents=torch.zeros(1, 4, 4, 4),
              image_times=torch.zeros(1), image_index=torch.zeros(1, 4, dtype=torch.long))


def test_image_slots_number_each_code_by_its_place_in_its_grid():
    """image.slot_embedding: a code's slot counts from its image's <boi> (0..P-1, row-major), text is -1; a chunk
    that starts inside an image (the engine's decode) goes on from slot_start; the embedding moves only codes."""
    from mixmodal.vocab import Vocab

    grid = 2
    config = ModelConfig(text_vocab_size=300, image=ImageConfig(mode="tokens", num_codes=16, grid_size=grid,
                                                               slot_embedding=True),
                         transformer=TransformerConfig(dim=16, num_layers=1, num_heads=2))
    model = FusionModel(config)
    v = Vocab(300, 16)
    code = v.image_code_to_id(torch.tensor(5)).item()
    ids = torch.tensor([[20, v.boi, code, code, code, code, v.eoi, 21, v.boi, code, code, code, code, v.eoi]])
    assert model.image_slots(ids).tolist() == [[-1, -1, 0, 1, 2, 3, -1, -1, -1, 0, 1, 2, 3, -1]]
    decode = torch.tensor([[code, v.eoi], [code, 20]])
    assert model.image_slots(decode, torch.tensor([3, 1])).tolist() == [[3, -1], [1, -1]]
    with pytest.raises(ValueError, match="slot_embedding is for image.mode=tokens"):
        ImageConfig(mode="latents", slot_embedding=True)
    plain = FusionModel(ModelConfig(text_vocab_size=300, image=ImageConfig(mode="tokens", num_codes=16, grid_size=grid),
                                    transformer=TransformerConfig(dim=16, num_layers=1, num_heads=2)))
    plain.load_state_dict({k: w for k, w in model.state_dict().items() if not k.startswith("image_")})
    text = torch.tensor([[20, 21, 22]])
    torch.testing.assert_close(model(text).logits, plain(text).logits)  # text alone: nothing added
    assert not torch.allclose(model(ids).logits[0, 3:], plain(ids).logits[0, 3:])


def test_cache_without_positions_and_mask_is_refused():
    """The defaults (positions from 0, a causal mask over the new tokens) are wrong once keys come
    from a cache: SDPA's is_causal aligns the first query with the first cached key."""
    model = FusionModel(ModelConfig(text_vocab_size=40, transformer=TransformerConfig(dim=32, num_layers=1, num_heads=2)))
    with pytest.raises(ValueError, match="with a KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=object())
