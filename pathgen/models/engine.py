"""The one interface every generation step calls: `Agent.generate(requests) -> answers`.

A step builds `Request`s (a prompt, an optional encoded image, an optional
JSON schema the answer must follow, a token limit) and gets `Answer`s back
(the text, why generation stopped, token counts, whether the schema was
enforced). Which engine answers is the agent's `engine` setting in
params.yaml:

    transformers  in-process Hugging Face LLaVA (pathgen.models.transformers_engine)
    llama_cpp     in-process GGUF through llama-cpp-python (pathgen.models.llama_cpp_engine)
    openai        any OpenAI-compatible server: vLLM, SGLang, llama.cpp's, `transformers serve`
                  (pathgen.models.openai_engine; it can launch its own, pathgen.models.server)

An `Agent` is lazy: its fingerprint (what keys the item cache) is computed
from the checkpoint's recorded hashes and the settings, without importing the
engine's library or loading weights; the engine is built on the first request
that the cache could not answer. A shard whose items are all cached never
loads its model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pathgen.errors import ModelError
from pathgen.models.fingerprint import checkpoint_files, file_sha256

FINISH_STOP = "stop"      # the model ended its answer (or the schema's grammar was complete)
FINISH_LENGTH = "length"  # cut at the request's max_tokens


@dataclass(frozen=True)
class Request:
    """One model call: a user prompt, optionally about one encoded image, optionally schema-bound."""

    prompt: str
    max_tokens: int
    image: bytes | None = None
    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class Answer:
    """What the engine answered, and how: the record kept in the item cache and the step's table."""

    text: str
    finish: str                # FINISH_STOP | FINISH_LENGTH
    prompt_tokens: int
    completion_tokens: int
    constrained: bool = False  # decoded under the request's schema

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Answer:
        return cls(**{k: record[k] for k in ("text", "finish", "prompt_tokens", "completion_tokens", "constrained")})


def in_order(answers: Iterator[tuple[int, Answer]], n: int) -> list[Answer]:
    """The `n` answers of a stream of (index, answer), by index."""
    out: list[Answer | None] = [None] * n
    for index, answer in answers:
        out[index] = answer
    return out  # type: ignore[return-value]


class Engine:
    """An engine: built from an agent's settings, answers batches of requests.

    Subclasses set `name`, `can_constrain` (schemas are enforced, not just
    asked for), `accepts_images`, and implement `generate`. `stream` yields
    (index, answer) as answers are ready; the default answers `batch_size`
    requests at a time, in order. An engine that keeps many requests in
    flight (openai) yields them as they complete.
    """

    name: ClassVar[str] = ""
    accepts_images: ClassVar[bool] = False
    can_constrain: bool = False
    batch_size: int = 1

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        raise NotImplementedError

    def stream(self, requests: Sequence[Request]) -> Iterator[tuple[int, Answer]]:
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            yield from enumerate(self.generate(batch), start)

    def count_tokens(self, text: str) -> int | None:
        """Tokens of `text` under the model's tokenizer, or None when the engine cannot tell."""
        return None

    def close(self) -> None:
        """Release what the engine holds (a launched server, GPU memory)."""


# engine name -> (module, class, distribution whose version enters the fingerprint or None,
#                 settings that do not change answers and stay out of the fingerprint)
ENGINES: dict[str, tuple[str, str, str | None, frozenset[str]]] = {
    "transformers": ("pathgen.models.transformers_engine", "TransformersEngine", "transformers",
                     frozenset({"device", "batch_size"})),
    "llama_cpp": ("pathgen.models.llama_cpp_engine", "LlamaCppEngine", "llama-cpp-python",
                  frozenset({"n_gpu_layers"})),
    "openai": ("pathgen.models.openai_engine", "OpenAIEngine", None,
               frozenset({"batch_size", "device", "n_gpu_layers"})),
}
# Under `openai:`, how the server is reached and paced; what it serves (model, launch) stays in.
OPENAI_RUNTIME_KEYS = frozenset({"url", "concurrency", "timeout_s", "max_retries", "startup_timeout_s"})


def engine_version(engine: str) -> str:
    """The engine library's version (from its installed metadata: nothing is imported)."""
    dist = ENGINES[engine][2]
    if dist is None:
        return "http"
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"engine '{engine}' needs the Python package {dist}, which is not installed") from None


def fingerprint_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide an agent's answers: everything but how it runs."""
    engine = settings["engine"]
    runtime = ENGINES[engine][3]
    out = {k: v for k, v in settings.items() if k not in runtime}
    if isinstance(out.get("openai"), dict):
        out["openai"] = {k: v for k, v in out["openai"].items() if k not in OPENAI_RUNTIME_KEYS}
    return out


def agent_fingerprint(settings: dict[str, Any], what: str, hash_store: str | Path | None = None) -> str:
    """sha256 over engine, its version, checkpoint file names and content hashes, and the answer-deciding
    settings (templates included). Content hashes come from `hash_store` where a file's recorded
    (size, mtime, inode) still match, so a 26 GB checkpoint is read once per file version."""
    engine = settings["engine"]
    if engine not in ENGINES:
        raise ModelError(f"params.yaml {what}.engine is '{engine}'; engines: {', '.join(sorted(ENGINES))}")
    root = Path(settings["checkpoint"])
    digest = hashlib.sha256()
    digest.update(json.dumps({"engine": engine, "version": engine_version(engine),
                              "settings": fingerprint_settings(settings)}, sort_keys=True).encode())
    for file in checkpoint_files(root, what):
        name = file.name if file == root else file.relative_to(root).as_posix()
        digest.update(name.encode() + b"\0" + file_sha256(file, hash_store).encode())
    return digest.hexdigest()


@dataclass
class EngineStats:
    """What an agent's engine did in this process (written to the job's stats)."""

    loaded: bool = False
    load_seconds: float = 0.0
    requests: int = 0
    generate_seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["load_seconds"] = round(self.load_seconds, 3)
        out["generate_seconds"] = round(self.generate_seconds, 3)
        return out


@dataclass
class Agent:
    """A named agent (describe, revise, summarize, prompts) on its engine, loaded on first use.

    `threads` caps an in-process engine's CPU threads; `log_dir` is where a
    launched server writes its log; `hash_store` is where checkpoint hashes
    are kept between jobs (see `agent_fingerprint`).
    """

    what: str
    settings: dict[str, Any]
    threads: int | None = None
    log_dir: str | Path | None = None
    hash_store: str | Path | None = None
    fingerprint: str = field(init=False)
    stats: EngineStats = field(init=False, default_factory=EngineStats)
    _engine: Engine | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.fingerprint = agent_fingerprint(self.settings, self.what, self.hash_store)

    @property
    def engine_name(self) -> str:
        return self.settings["engine"]

    @property
    def engine_class(self) -> type[Engine]:
        """The engine's class (its module imports its library only when an engine is built)."""
        module, cls, _, _ = ENGINES[self.engine_name]
        return getattr(importlib.import_module(module), cls)

    @property
    def engine(self) -> Engine:
        """The engine, built (weights loaded, server launched) on first access."""
        if self._engine is None:
            start = time.perf_counter()
            self._engine = self.engine_class(self.settings, self.what, threads=self.threads, log_dir=self.log_dir)
            self.stats.loaded = True
            self.stats.load_seconds = time.perf_counter() - start
        return self._engine

    def stream(self, requests: Sequence[Request]) -> Iterator[tuple[int, Answer]]:
        """(index, answer) for every request, as the engine finishes them (not always in order)."""
        if not requests:
            return
        if not self.engine_class.accepts_images and any(r.image is not None for r in requests):
            raise ModelError(f"params.yaml {self.what}.engine '{self.engine_name}' cannot read images")
        engine = self.engine
        start = time.perf_counter()
        try:
            for index, answer in engine.stream(requests):
                self.stats.requests += 1
                self.stats.prompt_tokens += answer.prompt_tokens
                self.stats.completion_tokens += answer.completion_tokens
                self.stats.truncated += answer.finish == FINISH_LENGTH
                yield index, answer
        finally:
            self.stats.generate_seconds += time.perf_counter() - start

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        """One answer per request, in order."""
        return in_order(self.stream(requests), len(requests))

    def chat(self, prompt: str, max_tokens: int, schema: dict[str, Any] | None = None) -> str:
        """The text of the answer to one prompt."""
        return self.generate([Request(prompt, max_tokens, schema=schema)])[0].text

    @property
    def can_constrain(self) -> bool:
        """Whether schemas are enforced (loads the engine: the openai engine's answer depends on settings)."""
        return self.engine.can_constrain

    def token_counter(self) -> Callable[[str], int] | None:
        """A token counter for the agent's model that loads no weights where the engine offers one
        (its module's `token_counter(settings)`); else the loaded engine's count; None if it cannot count."""
        if self._engine is None:
            module = importlib.import_module(ENGINES[self.engine_name][0])
            make = getattr(module, "token_counter", None)
            if make is not None:
                return make(self.settings)
        if self.engine.count_tokens("a") is None:
            return None
        return lambda text: self.engine.count_tokens(text)  # type: ignore[return-value]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

