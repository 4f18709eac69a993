"""Conversations (issue 20): the chat template, the JSONL messages form, the shapes world's
conversations, and supervised fine-tuning's loss mask (assistant turns only)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from mixmodal.data.chat import Turn, chat_segments, turns_of
from mixmodal.data.cm3 import CM3Config
from mixmodal.data.pipeline import IGNORE, DocumentEncoder, FusionBatches, PipelineConfig
from mixmodal.data.segments import Segment
from mixmodal.data.shapes import Edit, Scene, ShapesConfig, scene_split, shapes_document
from mixmodal.data.shapes.conversations import EXCHANGES
from mixmodal.data.sources import JsonlSource, ShapesSource, SourceSpecError, open_source
from mixmodal.documents import Document, Image, MalformedRecord, Text, record_to_document, write_jsonl
from mixmodal.inference import GenerationConfig
from mixmodal.inference.checkpoint import read_chat_template
from mixmodal.inference.config import GuidanceConfig
from mixmodal.objectives.diffusion import DiffusionConfig, build_schedule, diffusion_loss
from mixmodal.train.fusion import noise_images
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig
from mixmodal.vocab import Vocab
from tiny import prefills, tiny_engine

CHAT = ShapesConfig(resolution=32, tasks=["chat"], max_objects=2, chat_turns=3, story_length=2)


@pytest.fixture(scope="module")
def text_tokenizer():
    texts = (t for doc in ShapesSource(CHAT, num=200) for t in doc.texts)
    return TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=400))


def _batch(engine, docs, seed: int = 0, **pipeline):
    encoder = DocumentEncoder(engine.text_tokenizer, engine.image_tokenizer, engine.vocab, engine.mode)
    batches = FusionBatches(lambda: docs, encoder, PipelineConfig(seq_len=512, **pipeline), len(docs),
                            engine.per_image, endless=False, seed=seed)
    return next(iter(batches))


def test_chat_template_marks_only_assistant_turns_as_targets():
    vocab = Vocab(300, 16)
    text = lambda *ids: [Segment("text", list(ids))]  # noqa: E731
    parts = [text(30, 31), [Segment("image", [300] * 4, image=0)], text(40), text(50, 51)]
    turns = [Turn("system", 1), Turn("user", 2), Turn("assistant", 1)]
    segments = chat_segments(parts[:1] + parts[1:3] + parts[3:], turns, vocab)
    ids = [(i, s.loss) for s in segments for i in s.ids]
    assert ids[:4] == [(vocab.system, False), (30, False), (31, False), (vocab.end_of_turn, False)]
    assert ids[4] == (vocab.user, False) and all(not loss for _, loss in ids[4:11])
    assert ids[11:] == [(vocab.assistant, False), (50, True), (51, True), (vocab.end_of_turn, True)]
    prompt = chat_segments(parts[:3] + [[]], turns[:2] + [Turn("assistant", 1)], vocab)[:-2]
    prompt += [Segment("text", [vocab.assistant], loss=False)]
    assert [i for s in chat_segments(parts[:3], turns[:2], vocab, add_generation_prompt=True) for i in s.ids] == \
        [i for s in prompt for i in s.ids]  # the prompt is the prefix of the training conversation


@pytest.mark.parametrize("turns, message", [
    ([["user", 1]], "turns hold 1 parts but the document has 2"),
    ([["robot", 2]], r"turns\[0\] must be \[role, parts\] with role one of system, user, assistant"),
    ("user", "must be a non-empty list"),
])
def test_bad_turns_name_the_field(turns, message):
    with pytest.raises(ValueError, match=message):
        turns_of({"turns": turns}, 2)


def test_jsonl_messages_form_round_trips_and_bad_records_say_what_to_fix(tmp_path):
    docs = list(ShapesSource(CHAT, num=6))
    assert all(d.metadata["turns"] for d in docs)
    write_jsonl(docs, tmp_path / "chat.jsonl")
    records = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert all("messages" in r and "parts" not in r and "turns" not in r.get("metadata", {}) for r in records)
    back = list(JsonlSource(tmp_path / "chat.jsonl"))
    for a, b in zip(docs, back):
        assert a.texts == b.texts and a.metadata["turns"] == b.metadata["turns"] and a.num_images == b.num_images
    load = lambda data, origin: None  # noqa: E731  (text-only records below)
    doc = record_to_document({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "parts": [{"type": "text", "text": "hello"}]}]},
                             load, tmp_path)
    assert doc.texts == ["hi", "hello"] and doc.metadata["turns"] == [["user", 1], ["assistant", 1]]
    for record, message in [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r'messages\[0\] must be an object with "role"'),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "user", "content": "x"}], "parts": []}, '"parts" or "messages"'),
        ({"parts": [{"type": "text", "text": "x"}], "metadata": {"turns": [["user", 2]]}}, "turns hold 2 parts"),
    ]:
        with pytest.raises(MalformedRecord, match=message):
            record_to_document(record, load, tmp_path)


def test_shapes_conversations_follow_the_world_rules():
    docs = [shapes_document(CHAT, "train", i) for i in range(300)]
    kinds = Counter(e["kind"] for d in docs for e in d.metadata["exchanges"])
    assert set(kinds) == set(EXCHANGES)
    for doc in docs:
        turns = doc.metadata["turns"]
        assert [r for r, _ in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert sum(n for _, n in turns) == len(doc.parts)
        assert len(doc.metadata["scenes"]) == doc.num_images
        scenes = [Scene.from_dict(s) for s in doc.metadata["scenes"]]
        assert all(scene_split(s) == "train" for s in scenes)  # nothing held out leaks into training
        for e in doc.metadata["exchanges"]:
            if e["kind"] == "edit":  # the edit turns the image it starts from into the one drawn
                assert Edit.from_dict(e["edit"]).apply(scenes[e["before"]]) == scenes[e["image"]]
    # a follow-up asks about the picture the assistant drew earlier, without showing it again
    follow = [d for d in docs if d.metadata["exchanges"][0]["kind"] == "generate" and len(d.metadata["turns"]) > 2]
    assert follow and all(isinstance(d.parts[0], Text) for d in follow)
    for d in follow:
        (_, n_user), (_, n_assistant), (_, n_next) = d.metadata["turns"][:3]
        second_user = d.parts[n_user + n_assistant:n_user + n_assistant + n_next]
        assert not any(isinstance(p, Image) for p in second_user)


def test_chat_exchanges_weight_the_mix_and_leave_the_default_stream_alone():
    """chat_exchanges draws exchanges by weight (an edit-heavy SFT mix) and 0 drops one; an empty list is the
    uniform draw (the default stream: checked against the code before the option by a hash of 200
    conversations); bad entries name the field."""
    def kinds(config, n=400):
        docs = [shapes_document(config, "train", i) for i in range(n)]
        return Counter(d.metadata["exchanges"][0]["kind"] for d in docs), docs

    base, base_docs = kinds(CHAT)
    same, same_docs = kinds(ShapesConfig(**{**CHAT.__dict__, "chat_exchanges": []}))
    assert [(d.texts, d.metadata["scenes"]) for d in same_docs[:50]] == [(d.texts, d.metadata["scenes"]) for d in base_docs[:50]]
    heavy, _ = kinds(ShapesConfig(**{**CHAT.__dict__, "chat_exchanges": ["edit:5", "story:0"]}))
    assert heavy["edit"] / 400 > 0.4 > 0.3 > base["edit"] / 400  # 5/9 of openings vs 1/5
    assert heavy["story"] == 0 and base["story"] > 0
    spec = open_source("shapes:split=train,num=200,tasks=chat,chat_exchanges=edit:5+story:0,resolution=32")
    assert spec.config.chat_exchanges == ["edit:5", "story:0"]
    for bad, message in ((["paint:2"], "not an exchange"), (["edit:-1"], ">= 0"), (["edit:x"], "not a number"),
                         ([f"{k}:0" for k in EXCHANGES], "every weight is 0")):
        with pytest.raises(ValueError, match=message):
            ShapesConfig(tasks=["chat"], chat_exchanges=bad)


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_sft_rows_train_only_the_assistant(text_tokenizer, mode):
    engine = tiny_engine(mode, text_tokenizer)
    vocab = engine.vocab
    docs = [d for d in ShapesSource(CHAT, num=40) if d.metadata["exchanges"][0]["kind"] == "edit"][:2]
    batch = _batch(engine, docs, cm3=CM3Config(rate=1.0))  # CM3 leaves conversations alone
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    user_at, assistant_at = (ids == vocab.user).nonzero()[0].item(), (ids == vocab.assistant).nonzero()[0].item()
    assert (labels[:assistant_at] == IGNORE).all()  # nothing before <|assistant|> is predicted
    assert labels[assistant_at].item() == vocab.boi  # the assistant's reply is a target from its first token
    ends = (ids == vocab.end_of_turn).nonzero()[:, 0].tolist()
    assert labels[ends[1] - 1].item() == vocab.end_of_turn  # it learns to end its turn
    if mode == "latents":
        # the user's image is read, not written: fed clean, no diffusion loss; the edited image is a target
        flags = batch["image_loss"].tolist()
        assert flags[:2] == [False, True]
        user_image = batch["image_ids"][0, user_at:assistant_at]
        assert (user_image >= 0).any()
    else:
        first_image = (labels[user_at:assistant_at] != IGNORE).sum().item()
        assert first_image == 0


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_packing_never_splits_a_turn(text_tokenizer, mode):
    engine = tiny_engine(mode, text_tokenizer)
    vocab = engine.vocab
    long = [d for d in ShapesSource(CHAT, num=60) if len(d.metadata["turns"]) >= 4][:3]
    encoder = DocumentEncoder(engine.text_tokenizer, engine.image_tokenizer, vocab, engine.mode)
    batches = FusionBatches(lambda: long, encoder, PipelineConfig(seq_len=200 if mode == "tokens" else 56), 3,
                            engine.per_image, endless=False)
    batch = next(iter(batches))
    assert batches.stats.truncated > 0
    rows = [row[row != vocab.pad].tolist() for row in batch["input_ids"]]
    assert any(rows)
    for ids in filter(None, rows):
        ends = [i for i, t in enumerate(ids) if t == vocab.end_of_turn]
        assert ids[-1] == vocab.eos and ids[-2] == vocab.end_of_turn  # cut after a whole turn
        assert len(ends) % 2 == 0  # user and assistant turns come in pairs: no reply without its end
        if mode == "latents":
            assert batch["image_latents"].shape[0] == batch["image_loss"].shape[0] == int(batch["image_ids"].max()) + 1


@pytest.mark.parametrize("mode", ["tokens", "latents"])
def test_chat_dropout_trains_the_streams_instruct_guidance_feeds(text_tokenizer, mode):
    """An edit conversation with its conditioning dropped is exactly what the engine's unconditional
    (or image-only) stream is fed for that chat prompt, then the image the assistant draws."""
    engine = tiny_engine(mode, text_tokenizer)
    engine.chat_template = "mixmodal"
    vocab = engine.vocab
    edits = [d for d in ShapesSource(CHAT, num=80) if d.metadata["exchanges"][0]["kind"] == "edit"][:6]
    kept = set()
    for k, doc in enumerate(edits):
        batch = _batch(engine, [doc], seed=k, cond_dropout=1.0)  # each its own dropout draw
        n_user = doc.metadata["turns"][0][1]
        prompt = Document(doc.parts[:n_user], {"turns": [["user", n_user]]})
        config = GenerationConfig(mode="image", max_new_tokens=engine.per_image + 2,
                                  guidance=GuidanceConfig(scale=3.0, image_scale=1.5))
        cond, image_only, uncond = [ids for ids, _ in prefills(engine, [prompt], config)]
        row = batch["input_ids"][0].tolist()
        p = engine.per_image  # the stream's prompt, then exactly one image, then the end
        match = [s for s in (image_only, uncond) if row[:len(s)] == s and row[len(s)] == vocab.boi
                 and row[len(s) + 1 + p] == vocab.eoi and row[len(s) + 2 + p] == vocab.eos]
        assert len(match) == 1, (row[:12], image_only[:12], uncond[:12])
        kept.add(match[0] is image_only)
        start = len(match[0]) + 1  # the drawn image is a target (token mode: its codes)
        if mode == "tokens":
            assert (batch["labels"][0, start - 1:start - 1 + engine.per_image] >= vocab.image_code_ids.start).all()
        else:
            assert batch["image_loss"].tolist()[-1] is True
        assert vocab.user not in row and vocab.assistant not in row  # role tokens go with the text
    assert kept == {True, False}  # both the unconditional and the image-only stream are trained


def test_latent_sft_feeds_user_images_clean_and_weighs_them_zero():
    schedule = build_schedule(DiffusionConfig(kind="flow"))
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.5, 0.9, 0.3])
    targets = torch.tensor([False, True, True])
    noisy, times, weights = noise_images(schedule, x0, noise, t, targets, None)
    assert torch.equal(noisy[0], x0[0]) and times[0].item() == pytest.approx(1 / schedule.num_timesteps)
    assert torch.equal(noisy[1:], schedule.add_noise(x0, noise, t)[1:]) and torch.equal(times[1:], t[1:])
    assert weights.tolist() == [0.0, 1.0, 1.0]
    retrieved = torch.tensor([1.0, 0.1, 1.0])  # retrieval's alpha weights multiply
    assert noise_images(schedule, x0, noise, t, targets, retrieved)[2].tolist() == pytest.approx([0.0, 0.1, 1.0])
    assert noise_images(schedule, x0, noise, t, torch.ones(3, dtype=torch.bool), None)[2] is None
    prediction = torch.randn(3, 4, 8, 8)
    target = schedule.target(x0, noise, times)
    loss = diffusion_loss(prediction, target, weight=1.0, image_weights=weights)
    only_targets = diffusion_loss(prediction[1:], target[1:], weight=1.0)
    assert loss.item() == pytest.approx(only_targets.item(), rel=1e-5)


def test_a_conversation_prompt_is_the_prefix_of_its_training_row(text_tokenizer):
    engine = tiny_engine("tokens", text_tokenizer)
    engine.chat_template = "mixmodal"  # what generation.yaml says of a model tuned on conversations
    doc = next(d for d in ShapesSource(CHAT, num=40) if d.metadata["exchanges"][0]["kind"] == "vqa")
    batch = _batch(engine, [doc])
    first_user = doc.metadata["turns"][0][1]
    prompt = Document(doc.parts[:first_user], {"turns": [["user", first_user]]})
    config = GenerationConfig(mode="text", max_new_tokens=2)
    (ids, _), = prefills(engine, [prompt], config)
    assert ids[-1] == engine.vocab.assistant
    assert ids == batch["input_ids"][0, :len(ids)].tolist()
    engine.chat_template = None  # a base model: the conversation's parts, laid out plainly
    (plain, _), = prefills(engine, [prompt], config)
    assert not {engine.vocab.user, engine.vocab.assistant, engine.vocab.end_of_turn} & set(plain)


def test_the_chameleon_template_has_no_role_tokens():
    vocab = Vocab(300, 16)
    parts = [[Segment("text", [30])], [Segment("text", [40, 41])]]
    turns = [Turn("user", 1), Turn("assistant", 1)]
    ids = [(i, s.loss) for s in chat_segments(parts, turns, vocab, template="chameleon") for i in s.ids]
    assert ids == [(30, False), (vocab.end_of_turn, False), (40, True), (41, True), (vocab.end_of_turn, True)]
    prompt = chat_segments(parts[:1], turns[:1], vocab, add_generation_prompt=True, template="chameleon")
    assert [i for s in prompt for i in s.ids] == [30, vocab.end_of_turn]  # the reply follows the user's <|end|>
    with pytest.raises(ValueError, match="chat template must be one of mixmodal, chameleon"):
        chat_segments(parts, turns, vocab, template="llama")


# --- fine-tuning: init_from and mixed sources --------------------------------------------------

def test_mix_source_samples_by_weight_and_resumes_exactly():
    spec = "mix:shapes:resolution=32,tasks=chat@3|shapes:resolution=32,tasks=vqa@1"
    docs = [d for _, d in zip(range(400), open_source(spec))]
    share = Counter(d.metadata["task"] for d in docs)["chat"] / len(docs)
    assert 0.68 < share < 0.82  # 3 : 1
    resumed = open_source(spec)
    resumed.skip(250)
    again = [d for _, d in zip(range(30), resumed)]
    assert [d.texts for d in again] == [d.texts for d in docs[250:280]]  # each source skipped by its own count
    for bad, message in [("mix:", "give sources as SPEC@WEIGHT"), ("mix:shapes@x", "is not a number"),
                         ("mix:shapes@0", "must be > 0"), ("mix:nowhere.jsonl@1", "nowhere.jsonl")]:
        with pytest.raises(SourceSpecError, match=message):
            open_source(bad)


def test_sft_starts_from_the_pretrained_weights_and_refuses_a_different_architecture(tmp_path):
    from mixmodal.config import ConfigError
    from mixmodal.tokenizers.image import save_image_tokenizer
    from mixmodal.tokenizers.vae import VAEConfig, VAETokenizer
    from mixmodal.train.run import load_run_config, train

    torch.manual_seed(0)
    trunk = dict(resolution=32, base_channels=8, channel_multipliers=[1, 2, 2], num_res_blocks=1, norm_groups=4)
    save_image_tokenizer(VAETokenizer(VAEConfig(**trunk, latent_channels=4)), tmp_path / "vae")
    tiny = Path(__file__).resolve().parents[1] / "configs/models/tiny-latents.yaml"
    base = load_run_config(tiny, [f"data.image_tokenizer={tmp_path / 'vae'}", "data.text_vocab_size=300",
                                  "data.text_tokenizer_documents=200", "trainer.steps=2"])
    train(base, tmp_path / "base")
    sft = load_run_config(tiny, [f"init_from={tmp_path / 'base'}", "trainer.steps=1", "trainer.lr=0.0",
                                 "trainer.warmup_steps=0", "data.source=mix:shapes:tasks=chat@3|shapes:tasks=caption@1"])
    assert sft.init_from == str((tmp_path / "base" / "model").resolve())  # a run names its model folder
    assert sft.data.image_tokenizer == str((tmp_path / "base" / "model" / "image_tokenizer").resolve())
    train(sft, tmp_path / "sft")
    before = load_file(str(tmp_path / "base" / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "sft" / "model" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # lr 0
    # the fine-tuned model says it speaks the chat template; the base model never saw a conversation
    assert read_chat_template(tmp_path / "sft" / "model") == "mixmodal"
    assert read_chat_template(tmp_path / "base" / "model") is None
    with pytest.raises(ConfigError, match=r"model.transformer.num_layers = 3 contradicts the checkpoint's"):
        load_run_config(tiny, [f"init_from={tmp_path / 'base'}", "model.transformer.num_layers=3"])
    with pytest.raises(ConfigError, match="no model folder there"):
        load_run_config(tiny, [f"init_from={tmp_path}"])


def test_a_reply_stops_at_the_end_of_its_turn(text_tokenizer):
    engine = tiny_engine("tokens", text_tokenizer)
    forward = engine.model.forward

    def closes_its_turn(ids, **kwargs):  # a model that ends its turn at once (and would go on to invent the next)
        out = forward(ids, **kwargs)
        out.logits[..., engine.vocab.end_of_turn] = out.logits.max() + 10
        return out

    engine.model.forward = closes_its_turn
    prompt = Document([Text("hello")], {"turns": [["user", 1]]})
    result = engine.generate([prompt], GenerationConfig(mode="text", max_new_tokens=8))[0]
    assert result.finish_reason == "eos" and result.ids[-1] == engine.vocab.end_of_turn and len(result.ids) == 1


def test_the_server_sends_a_conversation_in_the_models_template(text_tokenizer):
    from mixmodal.serve.app import Limits, Message, _chat_prompt

    messages = [Message(role="system", content="be brief"), Message(role="user", content="how many stars?"),
                Message(role="assistant", content="2"), Message(role="user", content="and circles?")]
    doc = _chat_prompt(messages, Limits())
    assert doc.metadata["turns"] == [["system", 1], ["user", 1], ["assistant", 1], ["user", 1]]
    engine = tiny_engine("tokens", text_tokenizer)
    engine.chat_template = "mixmodal"
    segments = engine_prompt_ids(engine, doc)
    v = engine.vocab
    assert [i for i in segments if i in (v.system, v.user, v.assistant, v.end_of_turn)] == \
        [v.system, v.end_of_turn, v.user, v.end_of_turn, v.assistant, v.end_of_turn, v.user, v.end_of_turn, v.assistant]


def engine_prompt_ids(engine, doc) -> list[int]:
    from mixmodal.inference.prompt import encode_prompt

    encoded = encode_prompt(doc, engine.text_tokenizer, engine.image_tokenizer, engine.vocab, engine.mode,
                            engine.chat_template)
    return [i for s in encoded.segments for i in s.ids]


# --- talking to a model: ChatSession and `mixmodal chat` ------------------------------------------

def test_a_chat_session_carries_the_conversation_and_saves_it(text_tokenizer, tmp_path):
    from mixmodal.inference.chat import ChatSession

    engine = tiny_engine("tokens", text_tokenizer)
    engine.chat_template = "mixmodal"
    prompts = []
    stream = engine.stream
    engine.stream = lambda doc, config, seed: (prompts.append((doc, seed)), stream(doc, config, seed=seed))[1]
    session = ChatSession(engine, GenerationConfig(mode="text", max_new_tokens=3), seed=7, out=tmp_path, system="hi")
    first = session.ask("how many stars?")
    session.ask("and circles?")
    (one, seed_one), (two, seed_two) = prompts
    assert seed_one == 7 and seed_two == 8  # reply k draws from seed + k
    assert one.metadata["turns"] == [["system", 1], ["user", 1]]
    assert two.metadata["turns"][:3] == [["system", 1], ["user", 1], ["assistant", len(first.parts)]]
    assert two.texts[:2] == ["hi", "how many stars?"] and two.texts[-1] == "and circles?"
    saved = session.save()
    back = next(iter(JsonlSource(saved)))
    assert [r for r, _ in back.metadata["turns"]] == ["system", "user", "assistant", "user", "assistant"]
    with pytest.raises(Exception, match="no such file"):
        session.attach(tmp_path / "missing.png")
    session.reset()
    assert session.document().metadata["turns"] == [["system", 1]]


def test_mixmodal_chat_starts_from_the_models_stated_sampling(text_tokenizer, tmp_path, monkeypatch):
    """`mixmodal chat` draws as the model's generation.yaml image_sampling says (what the shapes-chat eval
    scores and `mixmodal generate` uses), and its flags go over it."""
    import mixmodal.inference.chat as chat
    from mixmodal.cli import main
    from tiny import save_engine_folder

    save_engine_folder(tiny_engine("latents", text_tokenizer), tmp_path / "model", chat_template="mixmodal",
                       image_sampling={"cfg": 3.0, "diffusion_steps": 4, "guidance_interval": [0.0, 0.8]})
    sessions = []
    monkeypatch.setattr(chat, "run_repl", lambda session: sessions.append(session) or 0)
    assert main(["chat", str(tmp_path / "model")]) == 0
    assert main(["chat", str(tmp_path / "model"), "--cfg", "2", "--steps", "9"]) == 0
    stated, flagged = (s.config for s in sessions)
    assert (stated.guidance.scale, stated.diffusion_steps, stated.guidance.interval) == (3.0, 4, [0.0, 0.8])
    assert (flagged.guidance.scale, flagged.diffusion_steps, flagged.guidance.interval) == (2.0, 9, [0.0, 0.8])


def test_mixmodal_chat_in_a_terminal(text_tokenizer, tmp_path):
    """Drive the REPL in a pseudo-terminal as a user would: a message, a bad attachment, a drawn image,
    /save, /quit."""
    import os
    import pty
    import select
    import subprocess
    import sys

    from tiny import save_engine_folder

    engine = tiny_engine("tokens", text_tokenizer)
    save_engine_folder(engine, tmp_path / "model", chat_template="mixmodal")
    PIL.Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    main, secondary = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "mixmodal", "chat", str(tmp_path / "model"), "--mode", "image",
                             "--max-new-tokens", "80", "--out", str(tmp_path / "out")],
                            stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True)
    os.close(secondary)
    seen = b""

    def until(marker: bytes, timeout: float = 120) -> bytes:
        nonlocal seen
        import time
        end = time.time() + timeout
        while marker not in seen and time.time() < end:
            ready, _, _ = select.select([main], [], [], 1)
            if ready:
                try:
                    seen += os.read(main, 65536)
                except OSError:
                    break
        assert marker in seen, seen.decode(errors="replace")[-2000:]
        out, seen = seen, seen[seen.index(marker) + len(marker):]
        return out

    try:
        until(b"you> ")
        os.write(main, b"/image nowhere.png\n")
        answer = until(b"you> ")
        assert b"error:" in answer and b"nowhere.png: no such file" in answer
        os.write(main, f"/image {tmp_path / 'red.png'}\n".encode())
        until(b"you> ")
        os.write(main, b"draw it again\n")
        reply = until(b"you> ")
        assert b"[image " in reply and (tmp_path / "out" / "image_000.png").is_file()
        os.write(main, b"/save\n")
        until(b"you> ")
        os.write(main, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main)
    back = next(iter(JsonlSource(tmp_path / "out" / "conversation.jsonl")))
    assert back.metadata["turns"] == [["user", 2], ["assistant", 1]] and back.num_images == 2
