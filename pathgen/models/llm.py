"""The text LLM backend: a GGUF model through llama-cpp-python.

Used for text-only agents (summarize; report cleaning and attribute prompts).
Structured answers are constrained by a grammar compiled from a JSON schema,
so even a random tiny model answers with parseable JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pathgen.errors import ModelError
from pathgen.models.fingerprint import agent_fingerprint, checkpoint_files
from pathgen.text.hygiene import clean_generated_text


class LlamaCppAgent:
    """A chat model answering one prompt at a time, greedy unless configured."""

    backend = "llama-cpp"

    def __init__(self, checkpoint: str | Path, settings: dict[str, Any], what: str, threads: int | None = None):
        import llama_cpp  # heavy native library: import only when an agent is built

        self.checkpoint = Path(checkpoint)
        self.settings = settings
        checkpoint_files(self.checkpoint, what)
        self.fingerprint = agent_fingerprint(self.backend, llama_cpp.__version__, self.checkpoint, settings, what)
        self._llama_cpp = llama_cpp
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.checkpoint), n_ctx=settings["n_ctx"],
                                       seed=settings["seed"], n_threads=threads, n_threads_batch=threads,
                                       verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load {what} checkpoint {self.checkpoint} with llama.cpp: {exc}") from None
        self._grammars: dict[str, Any] = {}

    def _grammar(self, schema: dict[str, Any]):
        text = json.dumps(schema, sort_keys=True)
        if text not in self._grammars:
            self._grammars[text] = self._llama_cpp.LlamaGrammar.from_json_schema(text, verbose=False)
        return self._grammars[text]

    def chat(self, prompt: str, max_tokens: int, schema: dict[str, Any] | None = None) -> str:
        """The model's answer to one user prompt; constrained to `schema` when given."""
        extra = {"grammar": self._grammar(schema)} if schema is not None else {}
        result = self.llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=self.settings.get("temperature", 0.0),
            seed=self.settings["seed"],
            **extra,
        )
        return clean_generated_text(result["choices"][0]["message"]["content"] or "")
