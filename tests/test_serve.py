"""`mixmodal serve`'s API on a tiny random model: every endpoint, streaming, continuous batching
under concurrent requests, the same output as `mixmodal.generate`, limits and errors as JSON 4xx."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from pathlib import Path

import PIL.Image
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from mixmodal.data.shapes import ShapesConfig  # noqa: E402
from mixmodal.data.sources import ShapesSource  # noqa: E402
from mixmodal.inference import Engine  # noqa: E402
from mixmodal.inference.generate import generation_config  # noqa: E402
from mixmodal.serve import Limits, Scheduler, create_app  # noqa: E402
from mixmodal.tokenizers.text import TextTokenizer, TextTokenizerConfig  # noqa: E402
from tiny import tiny_engine  # noqa: E402

@pytest.fixture(scope="module")
def text_tokenizer():
    texts = (t for doc in ShapesSource(ShapesConfig(resolution=32), num=200) for t in doc.texts)
    return TextTokenizer.train(texts, TextTokenizerConfig(vocab_size=300))


def _engine(mode: str, text_tokenizer) -> Engine:
    engine = tiny_engine(mode, text_tokenizer)
    engine.max_length = 160  # a context, as a trained model folder has: a RunningBatch sizes its rows by it
    return engine


@pytest.fixture(scope="module", params=["tokens", "latents"])
def served(request, text_tokenizer):
    engine = _engine(request.param, text_tokenizer)
    scheduler = Scheduler(engine, max_batch=4, max_queue=16)
    app = create_app(scheduler, model_name="tiny", limits=Limits(max_tokens=128))
    with TestClient(app) as client:
        client.scheduler = scheduler
        yield engine, client


def _sse(response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


def _png(pixels: int = 16) -> str:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (pixels, pixels), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_models_health_and_metrics(served):
    engine, client = served
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["mode"] == engine.mode
    text = client.get("/metrics").text
    for name in ("mixmodal_queue_length", "mixmodal_running_rows", "mixmodal_positions_per_second",
                 "mixmodal_images_per_second", "mixmodal_latency_seconds_p99"):
        assert f"\n{name} " in "\n" + text


def test_chat_equals_generate_with_the_same_options_and_seed(served):
    engine, client = served
    body = {"messages": [{"role": "user", "content": "two red circles"}], "mode": "interleaved", "max_tokens": 60,
            "cfg": 2.0, "steps": 3, "seed": 5, "n": 2, "temperature": 0.8}
    reply = client.post("/v1/chat/completions", json=body).json()
    config = generation_config(mode="interleaved", cfg=2.0, steps=3, max_new_tokens=60, temperature=0.8)
    for k, choice in enumerate(reply["choices"]):
        alone = engine.generate("two red circles", config, seed=5 + k)[0]
        assert choice["finish_reason"] == alone.finish_reason
        content = choice["message"]["content"]
        texts = [p.text for p in alone.document.parts if hasattr(p, "text")]
        if isinstance(content, str):
            assert content == "".join(texts)
        else:
            assert [p["text"] for p in content if p["type"] == "text"] == texts
    assert reply["usage"]["completion_tokens"] == sum(
        len(engine.generate("two red circles", config, seed=5 + k)[0].ids) for k in range(2))
    assert reply["usage"]["prompt_tokens"] > 0


def test_images_api_draws_n_images_of_the_model_size(served):
    engine, client = served
    side = engine.image_tokenizer.config.resolution
    reply = client.post("/v1/images/generations", json={"prompt": "a blue star", "n": 2, "cfg": 3.0, "steps": 2,
                                                         "seed": 1}).json()
    assert len(reply["data"]) == 2
    images = [PIL.Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in reply["data"]]
    assert all(im.size == (side, side) for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # seeds 1 and 2
    wrong = client.post("/v1/images/generations", json={"prompt": "x", "size": "1024x1024"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "size"


def test_streaming_tells_text_and_images_as_they_are_written(served):
    engine, client = served
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}},
                                                      {"type": "text", "text": "a red square"}]}],
            "mode": "image", "steps": 4, "preview_every": 2, "stream": True, "seed": 3}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(response)
    events = [c.get("mixmodal", {}).get("event") for c in chunks]
    assert "image_started" in events and "image_done" in events
    assert events.index("image_started") < events.index("image_done")
    if engine.mode == "latents":
        assert "image_preview" in events
    done = next(c for c in chunks if c.get("mixmodal", {}).get("event") == "image_done")
    url = done["choices"][0]["delta"]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)


def test_concurrent_requests_share_the_batch_and_each_gets_its_own_answer(served):
    engine, client = served
    prompts = ["a red circle", "two blue squares", "a green star", "a cross", "three diamonds", "a pink star"]
    replies = {}
    forward = engine._forward
    engine._forward = lambda live, cache: (time.sleep(0.005), forward(live, cache))[1]  # requests surely overlap

    def ask(p):
        replies[p] = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": p}],
                                                               "mode": "text", "max_tokens": 30, "seed": 7}).json()

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine._forward = forward
    assert client.scheduler.stats["max_running"] >= 2  # they were decoded side by side
    assert client.scheduler.stats["max_running"] <= 4  # never more than max_batch
    config = generation_config(mode="text", max_new_tokens=30)
    for p in prompts:
        alone = engine.generate(p, config, seed=7)[0]
        assert replies[p]["choices"][0]["message"]["content"] == "".join(x.text for x in alone.document.parts)


@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     400, "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}]},
     400, "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     400, "messages.0.content.0.image_url.url"),
])
def test_bad_requests_get_a_json_4xx_naming_the_field(served, body, status, param):
    _, client = served
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"]


def test_not_json_huge_images_and_a_busy_queue(text_tokenizer):
    engine = _engine("tokens", text_tokenizer)
    scheduler = Scheduler(engine, max_batch=1, max_queue=1)
    app = create_app(scheduler, model_name="tiny", limits=Limits(max_image_pixels=100))
    with TestClient(app) as client:
        bad = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
        big = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png(16)}}]}]})
        assert big.status_code == 400 and "max_pixels" in big.json()["error"]["message"]
        many = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2})
        assert many.status_code == 429 and many.headers["retry-after"] == "1"
        assert client.get("/health").status_code == 200  # the scheduler is still there


def test_an_api_key_is_required_when_set(text_tokenizer):
    app = create_app(Scheduler(_engine("tokens", text_tokenizer)), model_name="tiny", api_key="s3cret")
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200  # liveness needs no key


def test_a_cancelled_sequence_leaves_the_batch_and_frees_its_rows(text_tokenizer):
    """What a client disconnect does: its sequences leave at the next step, waiting or running."""
    import asyncio
    import time

    from mixmodal.documents import Document, Text
    from mixmodal.serve.scheduler import Ticket

    engine = _engine("tokens", text_tokenizer)
    forward = engine._forward
    engine._forward = lambda live, cache: (time.sleep(0.01), forward(live, cache))[1]  # ~1.5 s for the whole text
    scheduler = Scheduler(engine, max_batch=1)
    config = generation_config(mode="text", max_new_tokens=150, overrides=["ignore_eos=true", "guidance.scale=2",
                                                                           "guidance.text=true"])

    async def main():
        loop = asyncio.get_running_loop()
        running, waiting = (Ticket(Document([Text(p)]), config, 0, loop) for p in ("a red star", "a blue square"))
        scheduler.submit([running])
        scheduler.submit([waiting])  # max_batch=1: it waits
        scheduler.start()
        await running.events.get()  # running now
        assert scheduler.rows == 2  # the sequence's two guidance streams
        scheduler.cancel([running, waiting])
        for _ in range(200):
            if scheduler.running == 0 and scheduler.queue_length == 0:
                break
            await asyncio.sleep(0.01)
        assert scheduler.running == 0 and scheduler.queue_length == 0 and scheduler.rows == 0
        assert scheduler.stats["cancelled"] == 2 and scheduler.stats["finished"] == 0

    asyncio.run(main())
    scheduler.stop()


@pytest.fixture(scope="module")
def live_server(text_tokenizer):
    """The app on a real socket (uvicorn in a thread), for clients that speak HTTP themselves."""
    import socket
    import time

    import uvicorn

    engine = _engine("latents", text_tokenizer)
    app = create_app(Scheduler(engine, max_batch=4), model_name="tiny", api_key="k3y")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_official_openai_client_chats_streams_and_draws(live_server):
    openai = pytest.importorskip("openai")
    engine, url = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    options = {"mode": "text", "cfg": 1.0}
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a red star"}],
                                           max_tokens=20, seed=4, temperature=0.9, extra_body=options)
    alone = engine.generate("a red star", generation_config(mode="text", max_new_tokens=20, temperature=0.9), seed=4)[0]
    assert reply.choices[0].message.content == "".join(p.text for p in alone.document.parts)
    assert reply.usage.completion_tokens == len(alone.ids)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a red star"}],
                                            max_tokens=20, seed=4, temperature=0.9, stream=True, extra_body=options)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content
    side = engine.image_tokenizer.config.resolution
    images = client.images.generate(model="tiny", prompt="a blue circle", n=2, size=f"{side}x{side}",
                                    response_format="b64_json", extra_body={"steps": 2, "seed": 0})
    assert len(images.data) == 2
    assert PIL.Image.open(io.BytesIO(base64.b64decode(images.data[0].b64_json))).size == (side, side)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=10**6)


def test_the_page_is_served_and_talks_to_the_api(served):
    _, client = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ("/v1/chat/completions", "image_preview", "image_done", "stream: true", 'type="file"'):
        assert needle in page.text


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs Debian's chromium and chromium-driver (`make test-browser` installs them)")
def test_the_page_in_headless_chromium_streams_an_image_and_text(live_server, tmp_path):
    """Type a prompt into the page in a real browser; the image and then text appear; screenshot kept."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, url = live_server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "key").send_keys("k3y")
        Select(driver.find_element(By.ID, "mode")).select_by_visible_text("image")
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("6")
        driver.find_element(By.ID, "prompt").send_keys("a photo of a red star", Keys.ENTER)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant img.done"))
        image = driver.find_element(By.CSS_SELECTOR, ".assistant img.done")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
        Select(driver.find_element(By.ID, "mode")).select_by_visible_text("text")
        driver.find_element(By.ID, "prompt").send_keys("describe it", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == 2
                   and d.find_elements(By.CSS_SELECTOR, ".assistant")[1].find_element(By.CSS_SELECTOR, ".body").text
                   and d.find_element(By.ID, "go").is_enabled())
        assert not driver.find_elements(By.CSS_SELECTOR, ".err")
        shots = Path(os.environ.get("MIXMODAL_TEST_ARTIFACTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shots / "serve-page.png"))
        assert (shots / "serve-page.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_an_error_inside_one_sequence_fails_that_request_only(text_tokenizer):
    engine = _engine("tokens", text_tokenizer)
    sample = engine._sample

    def flaky(seq, scores, params):
        if seq.config.text.temperature == 0.5 and len(seq.generated) == 3:
            raise RuntimeError("boom in one sequence")
        return sample(seq, scores, params)

    engine._sample = flaky
    scheduler = Scheduler(engine, max_batch=4)
    with TestClient(create_app(scheduler, model_name="tiny")) as client:
        replies = {}

        def ask(t):
            replies[t] = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "a star"}], "mode": "text", "max_tokens": 40,
                "temperature": t, "ignore_eos": True})

        threads = [threading.Thread(target=ask, args=(t,)) for t in (0.5, 0.9, 1.0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert replies[0.5].status_code == 500 and "boom in one sequence" in replies[0.5].json()["error"]["message"]
        for t in (0.9, 1.0):
            assert replies[t].status_code == 200
            assert replies[t].json()["usage"]["completion_tokens"] == 40
        assert scheduler.stats["failed"] == 1
        assert client.get("/health").status_code == 200


def test_the_server_answers_what_mixmodal_generate_writes(text_tokenizer, tmp_path):
    """Same model folder, prompt, options (CFG included) and seed: `mixmodal.generate` and the server agree."""
    import mixmodal
    from mixmodal.inference.checkpoint import load_checkpoint, write_generation_settings
    from mixmodal.model.io import save_model_dir
    from mixmodal.tokenizers.image import save_image_tokenizer

    engine = _engine("latents", text_tokenizer)
    folder = tmp_path / "model"
    save_model_dir(engine.model, folder)
    text_tokenizer.save(folder / "text_tokenizer")
    save_image_tokenizer(engine.image_tokenizer, folder / "image_tokenizer")
    write_generation_settings(folder, max_length=160, diffusion=None)
    written = mixmodal.generate(str(folder), "two red circles", mode="image", cfg=3.0, steps=4, seed=9, num=2,
                                temperature=0.8)
    app = create_app(Scheduler(load_checkpoint(folder)), model_name="model")
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "two red circles"}], "mode": "image", "cfg": 3.0, "steps": 4,
            "seed": 9, "n": 2, "temperature": 0.8}).json()
    for choice, result in zip(reply["choices"], written.results):
        served = [p for p in choice["message"]["content"] if p["type"] == "image_url"]
        png = base64.b64decode(served[0]["image_url"]["url"].split(",", 1)[1])
        mine = next(p.image for p in result.document.parts if hasattr(p, "image"))
        assert PIL.Image.open(io.BytesIO(png)).convert("RGB").tobytes() == mine.tobytes()


def test_the_server_starts_from_the_models_stated_sampling(text_tokenizer, tmp_path):
    """A request that names no cfg or steps is drawn as the model's generation.yaml image_sampling says, as
    `mixmodal generate` draws it; a request's own cfg and steps go over it."""
    import mixmodal
    from mixmodal.inference.checkpoint import load_checkpoint
    from tiny import save_engine_folder

    save_engine_folder(_engine("latents", text_tokenizer), tmp_path / "model", max_length=160,
                       image_sampling={"cfg": 3.0, "diffusion_steps": 4})
    folder = tmp_path / "model"
    stated = mixmodal.generate(str(folder), "two red circles", mode="image", seed=9, num=1)
    plain = mixmodal.generate(str(folder), "two red circles", mode="image", cfg=1.0, steps=2, seed=9, num=1)
    app = create_app(Scheduler(load_checkpoint(folder)), model_name="model")
    with TestClient(app) as client:
        def served(**options) -> bytes:
            reply = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "two red circles"}], "mode": "image", "seed": 9, **options})
            part = next(p for p in reply.json()["choices"][0]["message"]["content"] if p["type"] == "image_url")
            png = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
            return PIL.Image.open(io.BytesIO(png)).convert("RGB").tobytes()

        def image(generated) -> bytes:
            return next(p.image for p in generated.results[0].document.parts if hasattr(p, "image")).tobytes()

        assert served() == image(stated) != image(plain)
        assert served(cfg=1.0, steps=2) == image(plain)


def test_retrieved_documents_are_read_before_the_prompt_as_generate_lays_them_out(text_tokenizer):
    from mixmodal.documents import Document, Text

    engine = _engine("tokens", text_tokenizer)
    bank = [Document([Text("a small red star in the top left")]), Document([Text("two blue squares")])]
    asked = []

    def retriever(prompt, k):
        asked.append((prompt.texts, k))
        return bank[:k]

    body = {"messages": [{"role": "user", "content": "a red star"}], "mode": "text", "max_tokens": 20, "seed": 2}
    with TestClient(create_app(Scheduler(engine), model_name="tiny", retriever=retriever)) as client:
        with_docs = client.post("/v1/chat/completions", json={**body, "retrieve": 2}).json()
        without = client.post("/v1/chat/completions", json=body).json()
    assert asked == [(["a red star"], 2)]  # retrieve 0 asks nothing
    config = generation_config(mode="text", max_new_tokens=20)
    expected = engine.generate("a red star", config, seed=2, context=[bank])[0]
    assert with_docs["choices"][0]["message"]["content"] == "".join(p.text for p in expected.document.parts)
    assert with_docs["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
    with TestClient(create_app(Scheduler(engine), model_name="tiny")) as client:
        refused = client.post("/v1/chat/completions", json={**body, "retrieve": 1})
    assert refused.status_code == 400 and "--index" in refused.json()["error"]["message"]
