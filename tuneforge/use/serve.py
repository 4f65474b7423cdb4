"""tuneforge serve: a trained model behind HTTP (FastAPI + uvicorn).

    POST /predict   {"input": x} or {"inputs": [x, ...]}: texts (or [text, pair]), or base64 image files;
                    or multipart/form-data with image files (field `files`) or texts (field `texts`)
    GET  /health    the process is up
    GET  /ready     200 once a warm-up prediction has run, 503 before
    GET  /metadata  labels, task, input kind, and a summary of the run that trained the model
    GET  /docs      OpenAPI documentation

Concurrent requests are micro-batched: the first request waits up to `max_wait_ms` for others,
up to `max_batch` inputs run as one forward pass. Every limit answers at once with its status
and a one-line reason, never a stack trace: body too large 413, too many or too long inputs 422,
too many requests in flight 429, prediction slower than the timeout 504, missing or wrong bearer
token 401.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request) at
# definition time, and fastapi is imported inside create_app so that `tuneforge --help` stays fast.
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tuneforge.config import read_yaml
from tuneforge.errors import TuneforgeError
from tuneforge.use.predictor import Predictor

OPEN_PATHS = {"/health", "/ready", "/docs", "/openapi.json", "/docs/oauth2-redirect"}  # no token needed


@dataclass
class ServeSettings:
    max_batch: int = 32  # inputs per forward pass (1: no micro-batching)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_body_bytes: int = 10 * 2**20
    max_inputs: int = 64  # per request
    max_text_chars: int = 10_000  # per text
    max_concurrent: int = 64  # requests in flight; more get 429 at once
    timeout_s: float = 30.0  # per request, waiting and predicting
    token: str | None = None  # bearer token; None: no authentication


class MicroBatcher:
    """Collects inputs from concurrent requests into batches for one prediction thread."""

    def __init__(self, predict, max_batch: int, max_wait_ms: float):
        self.predict, self.max_batch, self.max_wait = predict, max(1, max_batch), max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self.worker: asyncio.Task | None = None
        self.batches = self.inputs = 0  # what has run, for /metadata (micro-batching at work: inputs > batches)

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run_alone(self, items: list):
        """One prediction outside the queue (the warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, items)

    async def submit(self, items: list) -> list:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((items, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            count, deadline = len(pending[0][0]), loop.time() + self.max_wait
            while count < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                count += len(pending[-1][0])
            pending = [(items, future) for items, future in pending if not future.done()]  # drop timed-out requests
            if not pending:
                continue
            batch = [x for items, _ in pending for x in items]
            self.batches, self.inputs = self.batches + 1, self.inputs + len(batch)
            try:
                results = await loop.run_in_executor(self.executor, self.predict, batch)
            except Exception as error:  # noqa: BLE001 - handed to each waiting request, which answers cleanly
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            start = 0
            for items, future in pending:
                if not future.done():
                    future.set_result(results[start:start + len(items)])
                start += len(items)


def _run_summary(predictor: Predictor) -> dict:
    """What /metadata says about the model's training, from the run's records when they are there and
    readable (a damaged record leaves its part out; it never stops the server)."""
    run_dir = predictor.folder.parent
    summary: dict = {"model_folder": str(predictor.folder)}
    try:
        if (run_dir / "eval.json").is_file():
            result = json.loads((run_dir / "eval.json").read_text())
            split = result.get("report_split")
            keys = ("num_examples", *predictor.task.summary_keys)  # the task's own headline metrics
            summary["evaluation"] = {"split": split, **{k: result["splits"][split].get(k) for k in keys}} if split else None
            summary["train_seconds"] = result.get("train_seconds")
        if (run_dir / "recipe.yaml").is_file():
            recipe = read_yaml(run_dir / "recipe.yaml")
            summary["base_model"] = recipe["model"].get("name") or recipe["model"].get("factory")
            summary["strategy"] = recipe["model"]["freeze"]["strategy"]
            summary["adapter"] = (recipe.get("adapter") or {}).get("method", "none")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TuneforgeError) as error:
        summary["records"] = f"unreadable ({type(error).__name__})"
    return summary


def _error(code: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=code)


def create_app(predictor: Predictor, settings: ServeSettings):
    from fastapi import FastAPI, Request

    batcher = MicroBatcher(predictor.predict, settings.max_batch, settings.max_wait_ms)
    status = {"ready": False, "in_flight": 0}
    run_summary = _run_summary(predictor)  # the run's records do not change while it serves: read them once

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        await batcher.run_alone([predictor.task.warm_up_input(predictor.modality)])  # the first forward pass is slow
        status["ready"] = True
        yield
        await batcher.stop()

    app = FastAPI(title="tuneforge model server", lifespan=lifespan,
                  description=f"{predictor.modality} {predictor.task.name}: {', '.join(predictor.info.label_names)}")
    _add_limits(app, settings, status)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"ready": True} if status["ready"] else _error(503, "warming up")

    @app.get("/metadata")
    async def metadata():
        return {**predictor.metadata, "run": run_summary,
                "limits": {k: v for k, v in vars(settings).items() if k != "token"},
                "served": {"batches": batcher.batches, "inputs": batcher.inputs}}

    @app.post("/predict", responses={413: {}, 422: {}, 429: {}, 504: {}})
    async def predict(request: Request):
        try:
            single, items = await _read_inputs(request, predictor, settings)
        except _BadRequest as bad:
            return _error(bad.code, bad.message)
        try:
            results = await asyncio.wait_for(batcher.submit(items), settings.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"no prediction within {settings.timeout_s:g} s")
        except TuneforgeError as problem:  # a problem only the prediction itself found
            return _error(422, problem.problems[0])
        return {"prediction": results[0]} if single else {"predictions": results}

    return app


def _add_limits(app, settings: ServeSettings, status: dict) -> None:
    """Every limit answers at once, before any work: token 401, body size 413, requests in flight 429."""
    from fastapi import Request

    @app.middleware("http")
    async def limits(request: Request, call_next):
        if request.url.path in OPEN_PATHS:  # health checks answer even when the server is busy
            return await call_next(request)
        if settings.token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {settings.token}".encode()):
                return _error(401, "missing or wrong bearer token (header Authorization: Bearer TOKEN)")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return _error(413, f"request body of {length} bytes is over the limit of {settings.max_body_bytes}")
        if status["in_flight"] >= settings.max_concurrent:
            return _error(429, f"{settings.max_concurrent} requests are already in progress; retry shortly")
        status["in_flight"] += 1
        try:
            return await call_next(request)
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            return _error(500, "internal error while handling the request")
        finally:
            status["in_flight"] -= 1


def _add_error_handlers(app) -> None:
    """FastAPI's own errors in the server's one-line form."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        return _error(422, f"invalid request: {first.get('msg', 'malformed')} at {'.'.join(map(str, first.get('loc', [])))}")


class _BadRequest(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


async def _body(request, limit: int) -> bytes:
    """The body, read in chunks and refused as soon as it passes the limit (no Content-Length needed)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _received(read, timeout: float):
    """A request body's reading, within the request's time: a client that sends its body slowly (or never) would
    otherwise hold one of the places in flight for as long as it likes, and enough of them lock every client out."""
    try:
        return await asyncio.wait_for(read, timeout)
    except asyncio.TimeoutError:
        raise _BadRequest(408, f"the request body did not arrive within {timeout:g} s") from None


async def _read_inputs(request, predictor: Predictor, settings: ServeSettings) -> tuple[bool, list]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        single, items = False, await _received(_form_inputs(request, predictor, settings.max_inputs), settings.timeout_s)
    else:
        payload = _parse_json(await _received(_body(request, settings.max_body_bytes), settings.timeout_s))
        if not isinstance(payload, dict) or ("input" in payload) == ("inputs" in payload):
            raise _BadRequest(422, 'give exactly one of "input" (one example) or "inputs" (a list)')
        single = "input" in payload
        items = [payload["input"]] if single else payload["inputs"]
        if not isinstance(items, list):
            raise _BadRequest(422, '"inputs" must be a list')
        if predictor.modality == "image":
            items = [_decode_image(item, index) for index, item in enumerate(items)]
    if not items:
        raise _BadRequest(422, "no inputs given")
    if len(items) > settings.max_inputs:
        raise _BadRequest(422, f"{len(items)} inputs in one request; the limit is {settings.max_inputs}")
    try:  # per request: a bad input gets its own 422 instead of failing the batch it would join
        items = await asyncio.to_thread(predictor.prepare, items)
    except TuneforgeError as problem:
        raise _BadRequest(422, problem.problems[0]) from None
    for index, item in enumerate(items):
        if any(len(text) > settings.max_text_chars for text in _texts(item)):
            raise _BadRequest(422, f"input {index} is longer than {settings.max_text_chars} characters")
    return single, items


def _texts(item) -> list[str]:
    """The texts of one prepared input: a text, a [text, pair], or a dict of texts (a question and its context)."""
    values = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else [item]
    return [value for value in values if isinstance(value, str)]


def _parse_json(body: bytes):
    """The body as JSON. Hostile JSON makes json.loads raise more than JSONDecodeError, and all of it is the
    client's mistake, so it gets a 422 rather than the 500 of an unexpected exception."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadRequest(422, 'the body must be JSON: {"input": ...} or {"inputs": [...]}') from None
    except ValueError:  # the other ValueError json.loads raises: an integer past Python's int-conversion limit
        raise _BadRequest(422, f"a number in the body has more than {sys.get_int_max_str_digits()} digits") from None
    except RecursionError:  # the decoder recurses once per nested list or object
        raise _BadRequest(422, "the body's JSON is nested too deeply") from None


async def _form_inputs(request, predictor: Predictor, limit: int) -> list:
    """The inputs of a multipart/form-data request: image files under `files`, or texts as plain fields under `texts`."""
    from starlette.exceptions import HTTPException

    if request.headers.get("content-length") is None:
        raise _BadRequest(411, "multipart requests need a Content-Length header")
    try:
        # The parser stops at the first part past the limit, so a huge form is never held whole.
        form = await request.form(max_files=limit, max_fields=limit)
    except HTTPException as problem:
        # Starlette answers too many parts with 400 and its own wording (which the test of this limit pins); for
        # the client it is the input limit, a 422 on every path. Other unreadable forms stay 400.
        if str(problem.detail).startswith("Too many"):
            raise _BadRequest(422, f"more than {limit} inputs in one request; the limit is {limit}") from None
        raise
    # A form value is a str (a plain field) or an UploadFile (a file); each field takes only one kind. Without
    # this check a file under `texts` was predicted as the text of its repr, "UploadFile(...)".
    if predictor.modality == "image":
        uploads = form.getlist("files")
        for index, upload in enumerate(uploads):
            if isinstance(upload, str):
                raise _BadRequest(422, f"input {index} under `files` is a plain form field, not a file; "
                                       "send each image as a file")
        return [await upload.read() for upload in uploads]
    texts = form.getlist("texts")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise _BadRequest(422, f"input {index} under `texts` is a file upload; send each text as a plain form field")
    return texts


def _decode_image(item, index: int) -> bytes:
    if not isinstance(item, str):
        raise _BadRequest(422, f"input {index}: images are sent as base64-encoded files (strings)")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest(422, f"input {index} is not valid base64") from None


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None,
          factory=None) -> None:
    import uvicorn

    predictor = Predictor(path, factory)
    app = create_app(predictor, settings or ServeSettings())
    print(f"serving {predictor.folder} on http://{host}:{port} (docs: /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
