"""`mixmodal serve`'s HTTP API (FastAPI): OpenAI-shaped chat completions and image generations in
front of the scheduler (scheduler.py), plus models, health and Prometheus metrics.

    POST /v1/chat/completions   messages -> interleaved text and images; `stream: true` for SSE
    POST /v1/images/generations prompt -> n images (b64_json)
    GET  /v1/models, /health, /metrics
    GET  /                      a chat page (page.html) that streams the reply's text and images

Sampling options map to a GenerationConfig through `generation_config`, the function
`mixmodal generate` uses, and request i's sequence k draws from seed + k: the same prompt,
options and seed give the same output here as from `mixmodal generate`. A conversation is laid
out in the model's chat template (generation.yaml `chat_template`, data/chat.py: role tokens
for a model fine-tuned on conversations, Meta's turns for a converted Chameleon), and for a
model never tuned on conversations plainly: its text and images one after the other.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mixmodal.data.bad_input import BadInputError, BadInputLog
from mixmodal.data.images import decode_image
from mixmodal.documents import Document, Image, Text
from mixmodal.inference.events import End, ImageDone, ImagePreview, ImageStarted, TextDelta
from mixmodal.inference.generate import generation_config
from mixmodal.serve.scheduler import Failure, QueueFull, Scheduler, Ticket


@dataclass
class Limits:
    max_tokens: int = 1024  # per sequence
    max_n: int = 8  # sequences per request
    max_body_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096  # per prompt image, checked from its header
    max_steps: int = 1000  # denoising steps
    model_name: str = ""  # set by create_app: requests naming another model get 404


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


# --- request bodies (unknown OpenAI fields such as `user` are accepted and ignored) -------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class Sampling(_Body):
    model: str | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0)
    cfg: float | None = Field(None, ge=0)  # classifier-free guidance scale (mixmodal)
    steps: int | None = Field(None, ge=1)  # denoising steps, latent mode (mixmodal)
    retrieve: int = Field(0, ge=0, le=8)  # documents retrieved from the memory bank before the prompt (mixmodal)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    modalities: list[Literal["text", "image"]] | None = None
    mode: Literal["text", "image", "interleaved", "free"] | None = None  # mixmodal: overrides modalities
    image_cfg: float | None = Field(None, ge=0)
    sampler: Literal["auto", "ddpm", "ddim", "flow"] | None = None
    max_images: int | None = Field(None, ge=0)
    preview_every: int | None = Field(None, ge=0)  # latent mode: a preview every k steps while streaming
    ignore_eos: bool = False  # as vLLM's: always write max_tokens (benchmarks)


class ImagesRequest(Sampling):
    prompt: str
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"


# --- the app ---------------------------------------------------------------------------------

def create_app(scheduler: Scheduler, *, model_name: str, api_key: str | None = None,
               limits: Limits | None = None, retriever: Callable[[Document, int], list[Document]] | None = None
               ) -> FastAPI:
    """The API in front of a scheduler (started on app start-up, stopped on shutdown). `retriever(prompt, k)`
    gives the k documents a request with `retrieve: k` reads before its prompt (CM3Leon; `mixmodal serve
    --index`), as `mixmodal generate --retrieve k` lays them out."""
    limits = replace(limits or Limits(), model_name=model_name)
    engine = scheduler.engine
    resolution = engine.image_tokenizer.config.resolution if engine.image_tokenizer is not None else None
    started = time.time()

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="mixmodal", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _error(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid" or not where:
            message, param = ("the body must be a JSON object (Content-Type: application/json): "
                              f"{message}"), None
        return _error(400, f"{param}: {message}" if param else message, param)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key: send `Authorization: Bearer KEY`", None)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            return _error(413, f"the body is {int(size)} bytes; the limit is {limits.max_body_bytes}", None)
        return await call_next(request)

    page = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "uptime_s": round(time.time() - started, 1)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                            "owned_by": "mixmodal", "mode": engine.mode, "resolution": resolution}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(scheduler, started), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        prompt = _chat_prompt(body.messages, limits)
        max_tokens = body.max_completion_tokens or body.max_tokens
        mode = body.mode or _mode(body.modalities)
        config = _config(body, limits, mode=mode, max_tokens=max_tokens, temperature=body.temperature,
                         top_p=body.top_p, image_cfg=body.image_cfg, sampler=body.sampler, max_images=body.max_images,
                         preview_every=body.preview_every if body.stream else None, ignore_eos=body.ignore_eos,
                         image_sampling=engine.image_sampling)
        context = await _retrieve(retriever, prompt, body.retrieve)
        tickets = _submit(scheduler, prompt, config, body, request, context)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_chat_stream(scheduler, tickets, rid, model_name, request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        ends = await _collect(scheduler, tickets, request)
        choices = [{"index": k, "message": {"role": "assistant", "content": _content(end.result.document)},
                    "finish_reason": end.result.finish_reason} for k, end in enumerate(ends)]
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": _usage(tickets, ends)}

    @app.post("/v1/images/generations")
    async def images(body: ImagesRequest, request: Request):
        if body.response_format != "b64_json":
            raise ApiError(400, "response_format: only b64_json is served (images are not stored)", "response_format")
        if resolution is None:
            raise ApiError(400, "this model has no image tokenizer: it cannot draw images", "model")
        if body.size is not None and body.size != f"{resolution}x{resolution}":
            raise ApiError(400, f"size: this model draws {resolution}x{resolution} images; got {body.size!r}", "size")
        config = _config(body, limits, mode="image", max_tokens=engine.per_image + 2,
                         image_sampling=engine.image_sampling)
        prompt = Document([Text(body.prompt)] if body.prompt else [])
        tickets = _submit(scheduler, prompt, config, body, request, await _retrieve(retriever, prompt, body.retrieve))
        ends = await _collect(scheduler, tickets, request)
        data = []
        for end in ends:
            pictures = [p.image for p in end.result.document.parts if isinstance(p, Image)]
            if not pictures:
                raise ApiError(500, "the model ended without an image", None)
            data.append({"b64_json": _png_b64(pictures[0])})
        return {"created": int(time.time()), "data": data}

    return app


# --- helpers ---------------------------------------------------------------------------------

def _error(status: int, message: str, param: str | None, headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status, headers=headers)


def _mode(modalities: list[str] | None) -> str | None:
    if not modalities:
        return None
    kinds = set(modalities)
    return "interleaved" if kinds == {"text", "image"} else ("image" if kinds == {"image"} else "text")


def _config(body: Sampling, limits: Limits, *, mode: str | None, max_tokens: int | None, temperature=None,
            top_p=None, image_cfg=None, sampler=None, max_images=None, preview_every=None, ignore_eos=False,
            image_sampling: dict | None = None):
    if body.model is not None and body.model != limits.model_name:
        raise ApiError(404, f"model: {body.model!r} is not served here; GET /v1/models lists {limits.model_name!r}",
                       "model")
    if body.n > limits.max_n:
        raise ApiError(400, f"n: at most {limits.max_n} per request; got {body.n}", "n")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens: at most {limits.max_tokens}; got {max_tokens}", "max_tokens")
    if body.steps is not None and body.steps > limits.max_steps:
        raise ApiError(400, f"steps: at most {limits.max_steps}; got {body.steps}", "steps")
    overrides = [f"text.top_p={top_p}", f"image.top_p={top_p}"] if top_p is not None else []
    overrides += [f"sampler={sampler}"] if sampler else []
    overrides += [f"preview_every={preview_every}"] if preview_every else []
    overrides += ["ignore_eos=true"] if ignore_eos else []
    try:
        return generation_config(mode=mode, cfg=body.cfg, image_cfg=image_cfg, steps=body.steps,
                                 max_new_tokens=max_tokens or limits.max_tokens, max_images=max_images,
                                 temperature=temperature, overrides=overrides, image_sampling=image_sampling)
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e), None) from None


def _chat_prompt(messages: list[Message], limits: Limits) -> Document:
    """The conversation as a document with turns (data/chat.py): the engine lays it out in the model's
    chat template, or plainly for a model never tuned on conversations."""
    parts: list = []
    turns: list[list] = []
    for m, message in enumerate(messages):
        before = len(parts)
        content = [ContentPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for p, part in enumerate(content):
            where = f"messages.{m}.content.{p}"
            if part.type == "text":
                if part.text is None:
                    raise ApiError(400, f"{where}.text: a text part needs `text`", f"{where}.text")
                if part.text:
                    parts.append(Text(part.text))
            else:
                if part.image_url is None:
                    raise ApiError(400, f"{where}.image_url: an image part needs `image_url.url`", f"{where}.image_url")
                parts.append(Image(_data_url_image(part.image_url.url, f"{where}.image_url.url", limits)))
        turns.append([message.role, len(parts) - before])
    return Document(parts, {"turns": turns})


def _data_url_image(url: str, where: str, limits: Limits) -> PIL.Image.Image:
    if not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, f"{where}: give the image inline as a data URL (data:image/png;base64,...); the "
                            "server fetches nothing", where)
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data URL's base64 does not decode", where) from None
    try:
        image = decode_image(data, where, log=BadInputLog(strict=True), max_pixels=limits.max_image_pixels)
    except BadInputError as e:
        raise ApiError(400, f"{e}", where) from None
    return image


async def _retrieve(retriever, prompt: Document, k: int) -> list[Document]:
    if not k:
        return []
    if retriever is None:
        raise ApiError(400, "retrieve: this server has no memory bank; start it with `mixmodal serve MODEL --index "
                            "INDEX` (or serve a model trained with retrieval)", "retrieve")
    return await asyncio.to_thread(retriever, prompt, k)  # embedding and search: off the event loop


def _submit(scheduler: Scheduler, prompt: Document, config, body: Sampling, request: Request,
            context: list[Document] = ()) -> list[Ticket]:
    loop = asyncio.get_running_loop()
    seed = body.seed if body.seed is not None else 0
    tickets = [Ticket(prompt, config, seed + k, loop, context=list(context)) for k in range(body.n)]
    try:
        scheduler.submit(tickets)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry shortly", None, {"Retry-After": "1"}) from None
    return tickets


async def _collect(scheduler: Scheduler, tickets: list[Ticket], request: Request) -> list[End]:
    ends = []
    try:
        for ticket in tickets:
            while True:
                item = await ticket.events.get()
                if isinstance(item, Failure):
                    raise ApiError(item.status, item.message, None)
                if isinstance(item, End):
                    ends.append(item)
                    break
    finally:
        if len(ends) < len(tickets):  # failed or the client went away: nothing keeps running for it
            scheduler.cancel(tickets)
    return ends


async def _chat_stream(scheduler: Scheduler, tickets: list[Ticket], rid: str, model_name: str, request: Request):
    created = int(time.time())

    def chunk(k: int, delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": k, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, ticket: Ticket) -> None:
        while True:
            item = await ticket.events.get()
            await merged.put((k, item))
            if isinstance(item, (End, Failure)):
                return

    pumps = [asyncio.create_task(pump(k, t)) for k, t in enumerate(tickets)]
    ends: list[End] = []
    done = 0
    try:
        for k in range(len(tickets)):
            yield chunk(k, {"role": "assistant", "content": ""})
        while done < len(tickets):
            k, item = await merged.get()
            if isinstance(item, Failure):
                yield f"data: {json.dumps({'error': {'message': item.message, 'type': 'server_error'}})}\n\n"
                done += 1
            elif isinstance(item, TextDelta):
                yield chunk(k, {"content": item.text})
            elif isinstance(item, ImageStarted):
                yield chunk(k, {}, mixmodal={"event": "image_started", "image": item.image})
            elif isinstance(item, ImagePreview):
                yield chunk(k, {}, mixmodal={"event": "image_preview", "image": item.image, "step": item.step,
                                             "steps": item.num_steps, "url": _png_data_url(item.preview)})
            elif isinstance(item, ImageDone):
                if item.pil is not None:
                    yield chunk(k, {"content": [{"type": "image_url", "image_url": {"url": _png_data_url(item.pil)}}]},
                                mixmodal={"event": "image_done", "image": item.image})
            elif isinstance(item, End):
                ends.append(item)
                yield chunk(k, {}, item.result.finish_reason)
                done += 1
        usage = _usage(tickets, ends)
        yield f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': model_name, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        if len(ends) < len(tickets):  # the client disconnected mid-stream: free its rows
            scheduler.cancel(tickets)


def _content(doc: Document) -> str | list[dict]:
    """Text only: a string (what every OpenAI client reads); with images: parts in the model's order."""
    if all(isinstance(p, Text) for p in doc.parts):
        return "".join(p.text for p in doc.parts)
    return [{"type": "text", "text": p.text} if isinstance(p, Text) else
            {"type": "image_url", "image_url": {"url": _png_data_url(p.image)}} for p in doc.parts]


def _usage(tickets: list[Ticket], ends: list[End]) -> dict:
    """Positions, as the model counts them: text tokens, and each image's positions with <boi> / <eoi>."""
    prompt = tickets[0].prompt_tokens or 0
    completion = sum(len(e.result.ids) for e in ends)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _png_b64(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _png_data_url(image: PIL.Image.Image) -> str:
    return "data:image/png;base64," + _png_b64(image)


def _prometheus(scheduler: Scheduler, started: float) -> str:
    s = scheduler.stats
    uptime = max(time.time() - started, 1e-9)
    lat = sorted(scheduler.latencies)
    first = sorted(scheduler.first_event_latencies)

    def quantile(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0

    lines: list[tuple[str, str, Any]] = [
        ("mixmodal_queue_length", "gauge", scheduler.queue_length),
        ("mixmodal_running_sequences", "gauge", scheduler.running),
        ("mixmodal_running_rows", "gauge", scheduler.rows),
        ("mixmodal_requests_total", "counter", s["requests"]),
        ("mixmodal_requests_rejected_total", "counter", s["rejected"]),
        ("mixmodal_sequences_finished_total", "counter", s["finished"]),
        ("mixmodal_sequences_failed_total", "counter", s["failed"]),
        ("mixmodal_sequences_cancelled_total", "counter", s["cancelled"]),
        ("mixmodal_engine_steps_total", "counter", s["steps"]),
        ("mixmodal_generated_positions_total", "counter", s["positions"]),
        ("mixmodal_images_total", "counter", s["images"]),
        ("mixmodal_positions_per_second", "gauge", round(s["positions"] / uptime, 3)),
        ("mixmodal_images_per_second", "gauge", round(s["images"] / uptime, 4)),
        ("mixmodal_latency_seconds_p50", "gauge", round(quantile(lat, 0.5), 4)),
        ("mixmodal_latency_seconds_p99", "gauge", round(quantile(lat, 0.99), 4)),
        ("mixmodal_first_event_seconds_p50", "gauge", round(quantile(first, 0.5), 4)),
        ("mixmodal_first_event_seconds_p99", "gauge", round(quantile(first, 0.99), 4)),
    ]
    return "".join(f"# TYPE {name} {kind}\n{name} {value}\n" for name, kind, value in lines)


__all__ = ["ApiError", "Limits", "create_app"]
