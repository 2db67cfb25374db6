"""The in-process `llama_cpp` engine: a GGUF chat model through llama-cpp-python.

Used for text agents (summarize; report cleaning and attribute prompts).
Requests with a JSON schema are decoded under a grammar that llama.cpp
compiles from the schema, so even a random tiny model answers with JSON
that parses. One request at a time (llama.cpp's in-process API is
single-stream); `n_gpu_layers` offloads layers where the installed wheel
was built with CUDA (the PyPI source build is CPU-only unless built with
CMAKE_ARGS="-DGGML_CUDA=on").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathgen.errors import ModelError
from pathgen.models.engine import FINISH_LENGTH, FINISH_STOP, Answer, Engine, Request
from pathgen.models.fingerprint import checkpoint_files
from pathgen.text.hygiene import clean_generated_text


def _tokenize_counter(llm: Any):
    return lambda text: len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def token_counter(settings: dict[str, Any]):
    """The GGUF's token count from its vocabulary alone (`vocab_only`: no weights are read)."""
    import llama_cpp

    try:
        vocab = llama_cpp.Llama(model_path=str(settings["checkpoint"]), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot read the vocabulary of {settings['checkpoint']} with llama.cpp: {exc}") from None
    return _tokenize_counter(vocab)


class LlamaCppEngine(Engine):
    """A GGUF chat model answering one prompt at a time, greedy unless configured."""

    name = "llama_cpp"
    can_constrain = True

    def __init__(self, settings: dict[str, Any], what: str, threads: int | None = None,
                 log_dir: str | Path | None = None):
        import llama_cpp  # heavy native library: imported when the engine is built

        self.settings = settings
        self.checkpoint = Path(settings["checkpoint"])
        checkpoint_files(self.checkpoint, what)
        self._llama_cpp = llama_cpp
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.checkpoint), n_ctx=settings["n_ctx"],
                                       seed=settings["seed"], n_threads=threads, n_threads_batch=threads,
                                       n_gpu_layers=settings.get("n_gpu_layers", 0), verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load {what} checkpoint {self.checkpoint} with llama.cpp: {exc}") from None
        self._grammars: dict[str, Any] = {}

    def _grammar(self, schema: dict[str, Any]):
        text = json.dumps(schema, sort_keys=True)
        if text not in self._grammars:
            self._grammars[text] = self._llama_cpp.LlamaGrammar.from_json_schema(text, verbose=False)
        return self._grammars[text]

    def count_tokens(self, text: str) -> int:
        return _tokenize_counter(self.llm)(text)

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        return [self._answer(r) for r in requests]

    def _answer(self, request: Request) -> Answer:
        extra = {"grammar": self._grammar(request.schema)} if request.schema is not None else {}
        result = self.llm.create_chat_completion(
            messages=[{"role": "user", "content": request.prompt}],
            max_tokens=request.max_tokens,
            temperature=self.settings.get("temperature", 0.0),
            seed=self.settings["seed"],
            **extra,
        )
        choice, usage = result["choices"][0], result.get("usage") or {}
        return Answer(
            text=clean_generated_text(choice["message"]["content"] or ""),
            finish=FINISH_LENGTH if choice.get("finish_reason") == "length" else FINISH_STOP,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            constrained=request.schema is not None,
        )
