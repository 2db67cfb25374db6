"""The `openai` engine: any OpenAI-compatible chat server (vLLM, SGLang, llama.cpp's, `transformers serve`).

The agent's `openai:` mapping says where the server is and how to talk to it:

    url                a running server's API base (http://host:8000/v1), or null
    launch             or a command template that starts one for the length of the job
                       ({checkpoint} {port} {host} {model} {python}; pathgen.models.server)
    model              the served model name sent in requests; null: with `url`, the first of
                       GET /v1/models; with `launch`, the checkpoint path (what servers call a
                       model served without a name; {model} in the template is the same)
    response_format    json_schema (vLLM, SGLang) | json_object (llama.cpp's server) | none
                       (the server cannot constrain, e.g. `transformers serve`: schemas are not sent)
    extra_body         fields added to every request (server-specific sampling settings,
                       e.g. llama.cpp's repeat_penalty); part of the fingerprint
    concurrency        requests in flight (default 16), so the server's continuous batching stays full
    timeout_s, max_retries, startup_timeout_s

Decoding is greedy (temperature 0) unless the agent sets `do_sample` or
`temperature`; `seed` is sent where the agent has one. Schemas are sent with
sorted keys, as the in-process engines compile them, so a constrained
answer lists properties in the same order whichever engine decodes it.
Transient failures (connection errors, 408/409/429/5xx) are retried with
exponential backoff by the openai client; what still fails is one
`ModelError` line naming the agent, the engine and the URL.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from pathgen.errors import ModelError
from pathgen.models.engine import FINISH_LENGTH, FINISH_STOP, Answer, Engine, Request, in_order
from pathgen.text.hygiene import clean_generated_text

RESPONSE_FORMATS = ("json_schema", "json_object", "none")
DEFAULTS: dict[str, Any] = {"url": None, "launch": None, "model": None, "concurrency": 16, "timeout_s": 600.0,
                            "max_retries": 3, "startup_timeout_s": 900.0, "response_format": "json_schema",
                            "extra_body": None}


def _cause(exc: BaseException) -> str:
    """The most specific message of an exception chain, on one line ('Connection refused', not 'Connection error.')."""
    messages = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(getattr(exc, "strerror", None) or exc).strip()
        if text:
            messages.append(text)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = messages[-1] if messages else "unknown error"
    if "Connection refused" in " ".join(messages):
        text = "Connection refused"
    return " ".join(text.split())


class OpenAIEngine(Engine):
    """Requests to an OpenAI-compatible server, `concurrency` at a time, answers in completion order."""

    name = "openai"
    accepts_images = True

    def __init__(self, settings: dict[str, Any], what: str, threads: int | None = None,
                 log_dir: str | Path | None = None):
        import openai  # imported when the engine is built

        self.settings = settings
        self.what = what
        given = settings.get("openai") or {}
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            raise ModelError(f"params.yaml {what}.openai has unknown key(s) {', '.join(unknown)}; "
                             f"known: {', '.join(DEFAULTS)}")
        self.options = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
        opts = self.options
        if opts["response_format"] not in RESPONSE_FORMATS:
            raise ModelError(f"params.yaml {what}.openai.response_format is {opts['response_format']!r}; "
                             f"one of {', '.join(RESPONSE_FORMATS)}")
        if (opts["url"] is None) == (opts["launch"] is None):
            raise ModelError(f"params.yaml {what}.openai needs exactly one of url (a running server) "
                             f"and launch (a command that starts one)")
        if int(opts["concurrency"]) < 1:
            raise ModelError(f"params.yaml {what}.openai.concurrency must be >= 1, got {opts['concurrency']}")
        self.can_constrain = opts["response_format"] != "none"
        self.concurrency = int(opts["concurrency"])
        self.batch_size = self.concurrency
        self._openai = openai
        self._closed = False
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.client = None
        self.server = None
        self.model = opts["model"]
        if opts["launch"] is not None:
            from pathgen.models.server import launch_server

            checkpoint = str(settings["checkpoint"])
            if self.model is None:
                # What vLLM, SGLang, llama.cpp's server and `transformers serve` call a model
                # served without a name: its path as given. {model} in the template is the same.
                self.model = checkpoint
            self.server = launch_server(opts["launch"], checkpoint, self.model, what,
                                        log_dir=log_dir, startup_timeout_s=float(opts["startup_timeout_s"]))
            self.url = self.server.url
        else:
            self.url = str(opts["url"]).rstrip("/")
        try:
            import httpx2  # the openai client's HTTP library

            # `concurrency` requests in flight, each on its own kept-alive connection.
            http_client = openai.DefaultHttpxClient(
                limits=httpx2.Limits(max_connections=self.concurrency + 4,
                                     max_keepalive_connections=self.concurrency),
                trust_env=self.server is None,  # a launched server is on 127.0.0.1: never through a proxy
            )
            self.client = openai.OpenAI(base_url=self.url, api_key="EMPTY", timeout=float(opts["timeout_s"]),
                                        max_retries=int(opts["max_retries"]), http_client=http_client)
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"{what}-openai")
            if self.model is None:
                self.model = self._served_model()
        except BaseException:
            self.close()  # a launched server does not outlive a failed start
            raise

    # --- errors -----------------------------------------------------------------

    def _error(self, exc: BaseException) -> ModelError:
        """One line: agent, engine, URL, what went wrong (and the launched server's exit, if it has exited)."""
        status = getattr(exc, "status_code", None)
        reason = _cause(exc)
        if isinstance(exc, self._openai.APITimeoutError):
            reason = f"no answer within {float(self.options['timeout_s']):g} s"
        elif status is not None:
            body = getattr(exc, "body", None)
            if isinstance(body, dict):
                detail = body.get("message") or body.get("detail") or json.dumps(body)
            else:
                detail = body or getattr(exc, "message", "")
            detail = " ".join(str(detail).split())
            reason = f"HTTP {status}: {detail[:300]}"
        exited = self.server.describe_exit() if self.server is not None else None
        return ModelError(f"{self.what}: openai engine at {self.url} failed: {reason}"
                          + (f"; {exited}" if exited else ""))

    def _served_model(self) -> str:
        try:
            models = self.client.models.list()
        except self._openai.OpenAIError as exc:
            raise self._error(exc) from None
        ids = [m.id for m in models.data]
        if not ids:
            raise ModelError(f"{self.what}: openai engine at {self.url} serves no model (GET /models is empty)")
        return ids[0]

    # --- requests ---------------------------------------------------------------

    def _sampling(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {}
        if s.get("temperature") is not None:
            out["temperature"] = float(s["temperature"])
        elif not s.get("do_sample", False):
            out["temperature"] = 0.0  # greedy; sampling without a temperature keeps the server's default
        if s.get("seed") is not None:
            out["seed"] = int(s["seed"])
        return out

    def _body(self, request: Request) -> dict[str, Any]:
        if request.image is not None:
            data = base64.b64encode(request.image).decode("ascii")
            content: Any = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
                            {"type": "text", "text": request.prompt}]
        else:
            content = request.prompt
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": content}],
                                "max_tokens": int(request.max_tokens), **self._sampling()}
        if request.schema is not None and self.can_constrain:
            schema = json.loads(json.dumps(request.schema, sort_keys=True))
            if self.options["response_format"] == "json_schema":
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "answer", "schema": schema, "strict": True}}
            else:
                body["response_format"] = {"type": "json_object", "schema": schema}
        if self.options["extra_body"]:
            body["extra_body"] = dict(self.options["extra_body"])
        return body

    def _answer(self, request: Request) -> Answer:
        try:
            result = self.client.chat.completions.create(**self._body(request))
        except self._openai.OpenAIError as exc:
            raise self._error(exc) from None
        if not result.choices:
            raise ModelError(f"{self.what}: openai engine at {self.url} failed: an answer without choices")
        choice, usage = result.choices[0], result.usage
        return Answer(
            text=clean_generated_text(choice.message.content or ""),
            finish=FINISH_LENGTH if choice.finish_reason == "length" else FINISH_STOP,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            constrained=request.schema is not None and self.can_constrain,
        )

    def stream(self, requests: Sequence[Request]) -> Iterator[tuple[int, Answer]]:
        """(index, answer) as each completes, `concurrency` requests in flight; the first failure raises."""
        if self._closed:
            raise ModelError(f"{self.what}: openai engine at {self.url} is closed")
        pending = iter(range(len(requests)))
        running: dict[Future, int] = {}

        def submit_next() -> None:
            for index in pending:
                running[self._pool.submit(self._answer, requests[index])] = index
                return

        try:
            for _ in range(self.concurrency):
                submit_next()
            while running:
                done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=running.__getitem__):
                    index = running.pop(future)
                    answer = future.result()  # raises the request's ModelError
                    submit_next()
                    yield index, answer
        finally:
            for future in running:
                future.cancel()

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        return in_order(self.stream(requests), len(requests))

    def close(self) -> None:
        """Shut the pool down and stop a launched server."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            if self.client is not None:
                self.client.close()
        finally:
            if self.server is not None:
                self.server.stop()
