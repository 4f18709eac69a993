"""The mixed-modal engine: batched, KV-cached decoding that switches between text and images.

Each sequence of a batch runs a small state machine over one or more cache rows (one per
guidance stream; they all receive the same generated ids):

    text  ── samples a text id ────────────────────────────────> text
          ── samples <eos> / a stop string / out of room ──────> done
             (<eos> or <|end|>, which closes a chat turn: the tokenizer's stop_ids)
          ── samples <boi> ──> image
    image (tokens)   exactly N codes, logits restricted to the code range; after the
                     N-th, <eoi> is fed with it (no sampling) and text resumes
    image (latents)  block [<boi>, P noisy patches] -> a denoising step per forward over
                     the P patches, attending to the cached prefix; the noisy slots are
                     never committed. After the last step [P clean patches, <eoi>] is
                     written (committed) in one forward, whose last logits start the text.

Every step is one forward of the model over all live rows: a row's block may be one id,
a prompt, or an image, padded to the longest block (cache.py). The cache survives every
modality switch; nothing is re-prefilled. A finished sequence's rows are dropped. A sequence's
state (SequenceState) and the RunningBatch that steps it are batch.py's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch

from mixmodal.documents import Document
from mixmodal.inference.batch import Block, GeneratedImage, RunningBatch, SequenceState
from mixmodal.inference.cache import KVCache
from mixmodal.inference.config import GenerationConfig
from mixmodal.inference.detokenize import IncrementalDetokenizer
from mixmodal.inference.events import (End, Event, GenerationResult, ImageDone, ImagePreview, ImageStarted,
                                        TextDelta)
from mixmodal.inference.logits import contrastive_scores, guide, guided_scores, repetition_penalty, sample
from mixmodal.inference.precision import HalfWeights
from mixmodal.inference.prompt import PromptError, PromptLike, encode_prompt, prompt_ids, stream_segments, to_document
from mixmodal.model.bundle import GENERATION_FILE, IMAGE_TOKENIZER_DIR, Bundle, load_bundle
from mixmodal.objectives.diffusion import DiffusionConfig, build_schedule
from mixmodal.objectives.samplers import PatchTurns, make_sampler
from mixmodal.tokenizers.image import tokenizer_device
from mixmodal.tokenizers.pixels import pixel_convention
from mixmodal.vocab import NUM_MASK_SENTINELS


class Engine:
    """Generation from an early-fusion model with its tokenizers.

    `Engine.from_pretrained(RUN_OR_MODEL_DIR)` loads `mixmodal train`'s model folder."""

    def __init__(self, model, text_tokenizer, image_tokenizer, *, diffusion: DiffusionConfig | None = None,
                 max_length: int | None = None, dtype: torch.dtype | None = None, decode_images: bool = True,
                 image_generation: bool = True, chat_template: str | None = None,
                 image_preprocessing: str = "mixmodal", compile: bool = False) -> None:
        self.model = model.eval()
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer.eval() if image_tokenizer is not None else None
        self.vocab = model.vocab
        image = model.config.image
        self.mode, self.per_image = image.mode, image.positions_per_image
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.dtype = dtype  # bf16 / fp16: autocast over a copy whose Linear weights are cast once (precision.py)
        half = compile or dtype in (torch.bfloat16, torch.float16)  # compile (inference/compiled.py): a copy in fp32 too
        self._half = HalfWeights(model, dtype or torch.float32, compile=compile) if half else None
        self.decode_images = decode_images  # False: ImageDone / documents carry no pixels (benchmarks)
        self.image_generation = image_generation  # False: <boi> is never sampled (base Chameleon; generation.yaml)
        # how a conversation prompt is laid out (data/chat.py): "mixmodal" for a model tuned on conversations,
        # "chameleon" for a converted one; None: a conversation's parts are laid out plainly (a base model)
        self.chat_template = chat_template
        # how PIL images become tokenizer input and decoded pixels PIL images (tokenizers/pixels.py):
        # "mixmodal", or "chameleon" (Meta's pipeline) for a converted Chameleon; generation.yaml
        self.image_preprocessing = image_preprocessing
        self._pixels = pixel_convention(image_preprocessing)
        # the text -> image sampling the model was tuned for (generation.yaml image_sampling; the eval suite's
        # fields), which evals use over their defaults; None: none stated
        self.image_sampling: dict | None = None
        # a VQ tokenizer converted from transformers alone is encoder only: prompt images, but no pixels out
        self._can_decode = image_tokenizer is not None and getattr(image_tokenizer, "decoder", True) is not None
        if text_tokenizer.vocab_size > self.vocab.text_size:
            raise ValueError(f"the text tokenizer has {text_tokenizer.vocab_size} ids but the model's text range is "
                             f"{self.vocab.text_size} (model.text_vocab_size): they were not trained together")
        if self.mode == "tokens" and image.is_bidirectional:
            raise ValueError("this token-mode model attends bidirectionally inside images (model.image.bidirectional); "
                             "its codes cannot be sampled one at a time")
        self.schedule = build_schedule(diffusion or DiffusionConfig()) if self.mode == "latents" else None
        self.commit_time = 1.0 / self.schedule.num_timesteps if self.schedule is not None else 0.0
        v = self.vocab
        size = v.size
        self._text_allowed = torch.zeros(size, dtype=torch.bool)
        self._text_allowed[v.text_ids.start:v.text_ids.stop] = True
        for special in (v.eos, v.system, v.user, v.assistant, v.end_of_turn):
            self._text_allowed[special] = True
        self._free_extra = torch.zeros(size, dtype=torch.bool)
        self._free_extra[v.end_of_span] = True
        self._free_extra[v.mask(0):v.mask(0) + NUM_MASK_SENTINELS] = True
        self._codes_allowed = torch.zeros(size, dtype=torch.bool)
        self._codes_allowed[v.image_code_ids.start:v.image_code_ids.stop] = True
        # the tokenizer's model-specific rules (a converted Chameleon): ids that are not text, and end-of-turn stops
        self._never = torch.zeros(size, dtype=torch.bool)
        self._never[list(text_tokenizer.never_sample)] = True
        self._stops = list(text_tokenizer.stop_ids)
        self._text_allowed[self._stops] = True
        self._not_stop = torch.ones(size, dtype=torch.bool)
        self._not_stop[self._stops] = False

    # --- loading ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        *, require_image_tokenizer: bool = True, compile: bool = False) -> "Engine":
        """A run or model folder's engine (`load_bundle`; without image_tokenizer/ it writes only text, an error
        naming the folder with `require_image_tokenizer`); `compile`: decode through inference/compiled.py."""
        return cls.from_bundle(load_bundle(path, device=device, dtype=dtype,
                                           require_image_tokenizer=require_image_tokenizer), compile=compile)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, compile: bool = False) -> "Engine":
        """The engine of a Bundle: its model, tokenizers and generation settings (`checkpoint`: its folder)."""
        engine = cls(bundle.model, bundle.text_tokenizer, bundle.image_tokenizer, diffusion=bundle.diffusion,
                     max_length=bundle.max_length, dtype=bundle.dtype, image_generation=bundle.image_generation,
                     chat_template=bundle.chat_template, image_preprocessing=bundle.image_preprocessing, compile=compile)
        engine.image_sampling = bundle.image_sampling
        if bundle.folder is not None:
            engine.checkpoint = str(bundle.folder)
        return engine

    # --- public API -------------------------------------------------------------------------

    def generate(self, prompts: PromptLike | Sequence[PromptLike], config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                 *, seed: int | Sequence[int] | None = 0, generators: Sequence[torch.Generator] | None = None,
                 context: Sequence[Sequence[Document]] | None = None) -> list[GenerationResult]:
        """Generate for one prompt or a batch; returns one GenerationResult per prompt, in order."""
        results = {}
        for event in self.stream(prompts, config, seed=seed, generators=generators, context=context):
            if isinstance(event, End):
                results[event.index] = event.result
        return [results[i] for i in sorted(results)]

    @torch.no_grad()
    def stream(self, prompts: PromptLike | Sequence[PromptLike], config: GenerationConfig | Sequence[GenerationConfig] | None = None,
               *, seed: int | Sequence[int] | None = 0, generators: Sequence[torch.Generator] | None = None,
               context: Sequence[Sequence[Document]] | None = None) -> Iterator[Event]:
        """Yield TextDelta / ImageStarted / ImagePreview / ImageDone / End events as the batch is written.

        Sequence i draws from generators[i], or from a CPU generator seeded with seed (+ i),
        or seed[i]; a sequence samples the same whether it runs alone or in a batch.
        context[i] (retrieval augmentation): documents laid out before prompt i, as in
        training (`<bos> doc <eos>` each); the unconditional guidance streams go without them."""
        prompt_list = [prompts] if _is_single_prompt(prompts) else list(prompts)
        n = len(prompt_list)
        configs = list(config) if isinstance(config, (list, tuple)) else [config or GenerationConfig()] * n
        if len(configs) != n:
            raise ValueError(f"{len(configs)} configs for {n} prompts; give one config or one per prompt")
        if context is not None and len(context) != n:
            raise ValueError(f"{len(context)} context lists for {n} prompts; give one list (maybe empty) per prompt")
        gens = list(generators) if generators is not None else _generators(seed, n)
        sequences = self._start(prompt_list, configs, gens, context or [[]] * n)  # every prompt checked first
        capacity = max(len(b.ids) for s in sequences for b in s.blocks) + max(c.max_new_tokens for c in configs) \
            + self.per_image + 4
        batch = RunningBatch(self, capacity)
        batch.join(sequences)
        while batch:
            yield from batch.step()

    # --- set-up ---------------------------------------------------------------------------

    def _start(self, prompts: list[PromptLike], configs: list[GenerationConfig], gens,
               contexts: Sequence[Sequence[Document]]) -> list[SequenceState]:
        """Encode and check every prompt (sequence i gets index i) before any is run."""
        return [self._sequence(i, p, c, g, x) for i, (p, c, g, x) in enumerate(zip(prompts, configs, gens, contexts))]

    def _sequence(self, i: int, prompt: PromptLike, config: GenerationConfig, generator: torch.Generator,
                  context: Sequence[Document]) -> SequenceState:
        """Sequence i of `prompt`: its guidance streams' prompt blocks, checked against the context.
        Its rows are numbered from 0 until a RunningBatch places it."""
        if config.contrastive is not None and self.mode != "tokens":
            raise ValueError("contrastive decoding (CD-K) picks image codes; this is a latent-mode model")
        doc = to_document(prompt, self.image_preprocessing)
        encoded = encode_prompt(doc, self.text_tokenizer, self.image_tokenizer, self.vocab, self.mode, self.chat_template,
                                self.image_preprocessing)
        variants = stream_segments(encoded.segments, config.guidance, config.streams, self.vocab)
        prefix, prefix_images = self._context(context)
        blocks = []
        for v, segments in enumerate(variants):
            ids, images = prompt_ids(segments, self.vocab, self.mode, self.per_image)
            placed = [(start, encoded.latents[k]) for start, k in images] if self.mode == "latents" else []
            if v == 0 and prefix:  # the conditional stream reads the retrieved documents first
                ids = prefix + ids
                placed = prefix_images + [(len(prefix) + start, x) for start, x in placed]
            blocks.append(Block(ids, len(ids), prompt_images=placed) if self.mode == "latents" else Block(ids, len(ids)))
        length = len(blocks[0].ids)
        if self.max_length is not None and length >= self.max_length:
            what = f" of which {len(prefix)} are {len(context)} retrieved documents" if prefix else ""
            raise PromptError(f"prompt {i} is {length} positions long{what} (text tokens + {self.per_image + 2} per "
                              f"image); the model's context is {self.max_length}. Shorten the prompt"
                              + (", retrieve fewer documents" if prefix else "")
                              + " or pass a larger --max-length (beyond the trained length the model has not "
                              "learned positions)")
        if config.mode in ("image", "interleaved") and not self.image_generation:
            raise PromptError(f"mode={config.mode} writes images, but this model's {GENERATION_FILE} says "
                              "image_generation: false (a converted base Chameleon: Meta's release does not draw); use "
                              f"mode=text, or set image_generation: true in MODEL/{GENERATION_FILE} for weights "
                              "trained to draw (Anole)")
        if config.mode != "text" and self.image_tokenizer is None and self.decode_images:
            raise PromptError(f"mode={config.mode} writes images, but the checkpoint has no image tokenizer to turn "
                              "them into pixels; copy it into MODEL/image_tokenizer or use mode=text")
        if config.mode != "text" and self.image_generation and self.decode_images and not self._can_decode:
            folder = Path(getattr(self, "checkpoint", "MODEL")) / IMAGE_TOKENIZER_DIR
            raise PromptError(f"mode={config.mode} writes images, but {folder} is encoder only (encoder_only: true: "
                              "transformers' Chameleon ships no VQGAN decoder), so generated codes cannot become "
                              f"pixels. Add the decoder from Meta's vqgan.ckpt (with its vqgan.yaml; Anole ships both "
                              f"in tokenizer/): `mixmodal convert chameleon-vqgan vqgan.ckpt {folder}`, or reconvert "
                              "with `mixmodal convert hf-chameleon SRC OUT --vqgan vqgan.ckpt`; or use mode=text "
                              "(prompt images still work)")
        if config.streams > 1 and config.guidance.uncond == "mask" and self.vocab.mask(0) in set(
                self.text_tokenizer.never_sample):
            raise PromptError("guidance.uncond=mask feeds <mask:0>, which this model never learned (a converted "
                              "Chameleon: the slot holds an unused <reservedNNNNN>, vocab_map.json); use "
                              "guidance.uncond=empty, whose unconditional stream <bos> <boi> is Meta's <s> <racm3:break>")
        if config.guidance.interval is not None and self.mode != "latents":
            raise PromptError("guidance.interval applies to denoising times (latent mode); this model writes image "
                              "tokens: leave it unset")
        room = min(config.max_new_tokens, (self.max_length or length + config.max_new_tokens) - length)
        if config.mode == "image" and room < self.per_image + 2:
            raise PromptError(f"mode=image needs {self.per_image + 2} positions for one image (<boi>, "
                              f"{self.per_image} image positions, <eoi>); max_new_tokens={config.max_new_tokens} and "
                              f"the context ({self.max_length}) leave {room}: raise max_new_tokens")
        rows = list(range(len(variants)))
        sampler = make_sampler(config.sampler, self.schedule) if self.schedule is not None else None
        return SequenceState(i, config, generator, rows, list(blocks[0].ids), 0, blocks,  # length: on commit
                         sampler=sampler)

    def _context(self, docs: Sequence[Document]) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
        """Retrieved documents as the training pipeline lays them out: `<bos> doc <eos>` each."""
        ids: list[int] = []
        images: list[tuple[int, torch.Tensor]] = []
        for doc in docs:
            encoded = encode_prompt(doc, self.text_tokenizer, self.image_tokenizer, self.vocab, self.mode, self.chat_template,
                                    self.image_preprocessing)
            doc_ids, doc_images = prompt_ids(encoded.segments, self.vocab, self.mode, self.per_image, eos=True)
            if self.mode == "latents":
                images += [(len(ids) + start, encoded.latents[k]) for start, k in doc_images]
            ids += doc_ids
        return ids, images

    # --- one forward over every live row -------------------------------------------------

    def _forward(self, live: list[SequenceState], cache: KVCache):
        blocks = [b for s in live for b in s.blocks]
        width = max(len(b.ids) for b in blocks)
        rows = len(blocks)
        ids = torch.full((rows, width), self.vocab.pad, dtype=torch.long)
        image_ids = torch.full((rows, width), -1, dtype=torch.long)
        new = torch.tensor([len(b.ids) for b in blocks], dtype=torch.long)
        commit = torch.tensor([b.commit for b in blocks], dtype=torch.long)
        latents, times, index = [], [], []
        for r, b in enumerate(blocks):
            ids[r, :len(b.ids)] = torch.tensor(b.ids, dtype=torch.long)
            spans = [(off, x, self.commit_time) for off, x in b.prompt_images] + ([b.latent] if b.latent else [])
            for k, (off, x, t) in enumerate(spans):
                image_ids[r, off:off + self.per_image] = k
                latents.append(x)
                times.append(t)
                index.append(r * width + off + torch.arange(self.per_image))
        if any(isinstance(t, torch.Tensor) for t in times):  # the patch_groups sampler: a time per patch
            times = torch.stack([t if isinstance(t, torch.Tensor) else torch.full((self.per_image,), t) for t in times])
        device = self.device
        positions = cache.begin_step(width)
        mask = cache.step_mask(new.to(device), image_ids.to(device))
        kwargs = {}
        if latents:
            kwargs = dict(image_latents=torch.stack(latents).to(device), image_times=torch.as_tensor(times, device=device),
                          image_index=torch.stack(index).to(device))
        if self.model.config.image.slot_embedding:  # where each block's codes sit in their image's grid
            kwargs["slot_start"] = torch.tensor([b.slot_start for b in blocks], dtype=torch.long, device=device)
        with self._autocast():
            out = (self._half.model() if self._half else self.model)(ids.to(device), positions=positions, cache=cache,
                                                                     mask=mask, logits_index=(new - 1).clamp(min=0)[:, None].to(device), **kwargs)
        cache.commit(commit.to(device))
        predictions = {}
        if latents:
            k = 0
            for r, b in enumerate(blocks):
                k += len(b.prompt_images)
                if b.latent is not None:
                    predictions[r] = out.image_prediction[k].float()
                    k += 1
        return out.logits[:, 0].float(), predictions

    def _autocast(self):
        half = self.dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(self.device.type, dtype=self.dtype) if half else contextlib.nullcontext()

    # --- the state machine ------------------------------------------------------------------

    def _advance(self, seq: SequenceState, output) -> Iterator[Event]:
        logits, predictions = output
        config = seq.config
        was = seq.blocks[0]
        seq.length += was.commit
        if was.denoise:  # a denoising step
            yield from self._denoise(seq, [predictions[r] for r in seq.rows])
            return
        if self.mode == "latents" and seq.phase == "image":  # the clean image + <eoi> were just written
            yield from self._finish_image(seq, seq.x)
        if seq.phase == "image":
            allowed = self._codes_allowed
            if config.contrastive is not None:
                scores = contrastive_scores(logits[seq.rows[0]], logits[seq.rows[-1]], allowed, config.contrastive)
                token = sample(scores, config.image, seq.generator, truncate=False)
            else:
                scores = guided_scores([logits[r] for r in seq.rows], allowed, config.guidance.scale,
                                       config.guidance.image_scale, config.guidance.plausibility)
                token = self._sample(seq, scores, config.image)
            seq.codes.append(token)
            done = len(seq.codes) == self.per_image  # (slot_start: the fed code's place in the grid)
            self._feed(seq, [token, self.vocab.eoi] if done else [token], slot_start=len(seq.codes) - 1)
            if done:
                g = self.model.config.image.grid_size
                yield from self._finish_image(seq, self.vocab.id_to_image_code(torch.tensor(seq.codes)).view(g, g))
            return
        # text phase: pick the next id, if there is room for one
        if self._room(seq) < 1:
            seq.finish = "length"
            yield from self._flush(seq)
            return
        token = self._forced(seq)
        if token is None:
            allowed = self._allowed(seq)
            streams = [logits[r] for r in seq.rows] if config.guidance.text else [logits[seq.rows[0]]]
            scores = guided_scores(streams, allowed, config.guidance.scale, config.guidance.image_scale,
                                   config.guidance.plausibility)
            token = self._sample(seq, scores, config.text)
        v = self.vocab
        if token in self._stops or token == v.boi:
            yield from self._flush(seq)
        if token in self._stops:  # <eos>, and <|end|> (the end of an assistant's turn)
            seq.finish = "eos"
            seq.generated.append(token)
            return
        if token == v.boi:
            seq.phase = "image"
            seq.codes = []
            yield ImageStarted(seq.index, len(seq.images))
            if self.mode == "latents":
                c, g = self.model.config.image.latent_channels, self.model.config.image.grid_size
                seq.x = torch.randn((c, g, g), generator=seq.generator, dtype=torch.float32)
                seq.times, seq.step = seq.sampler.times(config.diffusion_steps), 0
                seq.turns = None if config.patch_groups == 1 else PatchTurns(
                    self.per_image, config.patch_groups, self.model.config.image.patch_size, seq.generator)
                self._feed(seq, [token] + [v.pad] * self.per_image, commit=1,
                           latent=(1, seq.x, self._patch_times(seq, self._time(seq, 0))), denoise=True)
            else:
                self._feed(seq, [token])
            return
        # an ordinary text id
        if not seq.parts or not isinstance(seq.parts[-1], IncrementalDetokenizer):
            seq.parts.append(IncrementalDetokenizer(self.text_tokenizer))
        run = seq.parts[-1]
        seq.text_tokens += 1
        delta, stopped = run.stop_at(config.stop, run.add(token))
        if stopped:
            seq.finish = "stop"
        if delta:
            yield TextDelta(seq.index, delta)
        if not seq.finish:
            self._feed(seq, [token])
            if self._room(seq, pending=1) < 1:  # no room for the id after it: end now, not after one more forward
                seq.finish = "length"
                yield from self._flush(seq)

    def _flush(self, seq: SequenceState) -> Iterator[Event]:
        """A text run ends: stream what the incremental decoder still held back (an unfinished character)."""
        if seq.parts and isinstance(seq.parts[-1], IncrementalDetokenizer):
            rest = seq.parts[-1].flush()
            if rest:
                yield TextDelta(seq.index, rest)

    def _denoise(self, seq: SequenceState, streams: list[torch.Tensor]) -> Iterator[Event]:
        config = seq.config
        g = config.guidance
        t, t_prev = self._time(seq, seq.step), self._time(seq, seq.step + 1)
        guided = g.interval is None or g.interval[0] < t <= g.interval[1]
        prediction = guide(streams, g.scale, g.image_scale) if guided else streams[0]
        x = seq.sampler.step(seq.x[None], prediction[None], t, t_prev, seq.generator)[0]
        if seq.turns is not None:  # committed patches stay as they are
            x = seq.turns.hold(seq.x, x)
        seq.x, seq.step = x, seq.step + 1
        steps = len(seq.times) - 1
        if config.preview_every and seq.step % config.preview_every == 0 and seq.step < steps:
            x0 = self.schedule.predict_x0(x[None], prediction[None], t_prev)
            yield ImagePreview(seq.index, len(seq.images), seq.step, steps, self._decode_latents(x0)[0])
        again = seq.turns.next_turn(x, seq.generator) if seq.turns is not None and seq.step == steps else None
        if again is not None:  # patch_groups: this turn's group is committed; walk the grid again for the rest
            seq.x, seq.step = again, 0
            self._feed(seq, [self.vocab.pad] * self.per_image, commit=0,
                       latent=(0, again, self._patch_times(seq, self._time(seq, 0))), denoise=True)
        elif seq.step == steps:  # write the clean image and <eoi>
            self._feed(seq, [self.vocab.pad] * self.per_image + [self.vocab.eoi], latent=(0, x, self.commit_time))
        else:
            self._feed(seq, [self.vocab.pad] * self.per_image, commit=0,
                       latent=(0, x, self._patch_times(seq, t_prev)), denoise=True)

    def _finish_image(self, seq: SequenceState, content: torch.Tensor) -> Iterator[Event]:
        pil = None
        if self.decode_images:
            pil = self._decode_latents(content[None])[0] if self.mode == "latents" else self._decode_codes(content[None])[0]
        seq.images.append(content)
        seq.parts.append(GeneratedImage(pil))
        seq.phase = "text"
        yield ImageDone(seq.index, len(seq.images) - 1, pil, content)

    def _feed(self, seq: SequenceState, ids: list[int], *, commit: int | None = None, latent=None,
              denoise: bool = False, slot_start: int = 0) -> None:
        """Next step's block for every stream of `seq`; the committed ids are generated output."""
        commit = len(ids) if commit is None else commit
        seq.generated += ids[:commit]
        seq.seen += ids[:commit]
        seq.blocks = [Block(list(ids), commit, latent, denoise, slot_start=slot_start) for _ in seq.rows]

    def _room(self, seq: SequenceState, pending: int = 0) -> int:
        """Positions this sequence may still add: its budget, and the context after what is cached
        and the `pending` positions fed but not yet written."""
        budget = seq.config.max_new_tokens - len(seq.generated)
        if self.max_length is not None:
            budget = min(budget, self.max_length - seq.length - pending)
        return budget

    def _sample(self, seq: SequenceState, scores: torch.Tensor, params) -> int:
        if params.repetition_penalty != 1.0:
            finite = torch.isfinite(scores)
            scores = repetition_penalty(scores, torch.tensor(seq.seen, dtype=torch.long), params.repetition_penalty)
            scores = scores.masked_fill(~finite, float("-inf"))
        return sample(scores, params, seq.generator)

    def _forced(self, seq: SequenceState) -> int | None:
        # mode=image: the first id is <boi>; _start refused a prompt that leaves no room for one image
        if seq.config.mode == "image" and not seq.images and seq.phase == "text":
            return self.vocab.boi
        return None

    def _image_fits(self, seq: SequenceState) -> bool:
        return (self._can_decode or not self.decode_images) and self._room(seq) >= self.per_image + 2

    def _allowed(self, seq: SequenceState) -> torch.Tensor:
        config, v = seq.config, self.vocab
        allowed = self._text_allowed.clone()
        if config.mode == "free":
            allowed |= self._free_extra
        can_image = self.image_generation and config.mode != "text" and len(seq.images) < config.max_images \
            and self._image_fits(seq)
        allowed[v.boi] = can_image
        if config.mode == "image":
            allowed &= False
            allowed[v.boi] = can_image
            allowed[v.eos] = True
        if config.mode == "interleaved" and not (seq.images and seq.text_tokens):
            allowed[self._stops] = False
        if config.ignore_eos and (allowed & self._not_stop).any():
            allowed[self._stops] = False
        allowed &= ~self._never
        return allowed.to(self.device)

    # --- timing and decoding ----------------------------------------------------------------

    def _time(self, seq: SequenceState, step: int) -> float:
        return float(seq.times[step])

    def _patch_times(self, seq: SequenceState, t: float) -> float | torch.Tensor:  # one, or one per patch (patch_groups)
        return t if seq.turns is None else seq.turns.times(t)

    @torch.no_grad()
    def _decode_codes(self, codes: torch.Tensor):
        return self._pixels.to_images(self.image_tokenizer.decode(codes.to(tokenizer_device(self.image_tokenizer))))

    @torch.no_grad()
    def _decode_latents(self, latents: torch.Tensor):
        tok = self.image_tokenizer
        return self._pixels.to_images(tok.decode(tok.unscale_latents(latents.to(tokenizer_device(tok)))))


def _is_single_prompt(prompts) -> bool:
    if isinstance(prompts, (str, Document)):
        return True
    return any(not isinstance(p, (str, Document, list, tuple)) for p in prompts)


def _generators(seed, n: int) -> list[torch.Generator]:
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [(seed or 0) + i for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


__all__ = ["Engine", "RunningBatch"]
