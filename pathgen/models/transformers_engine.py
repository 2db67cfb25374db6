"""The in-process `transformers` engine: LLaVA in Hugging Face format, batched `generate`.

PathGen-LLaVA_desp and the revise agent are LLaVA-1.5 models; converted to
Hugging Face format (`llava-hf` layout) they load as
`LlavaForConditionalGeneration` + processor. Generation is batched with left
padding (batch-invariant: see tests/test_agents.py), greedy unless
configured, in `dtype` (`auto`: float16 on CUDA, float64 on the CPU, where
greedy text is then the same on every CPU: float32 logits differ in their last
bits between AVX2 and AVX-512 kernels, and a near-tie flips a token). Requests with a JSON schema are
decoded under it by xgrammar (a grammar compiled once per schema, a logits
mask per row), so every answer parses and follows the schema unless it is
cut by the token limit.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers
from PIL import Image

from pathgen.errors import ModelError
from pathgen.models.device import resolve_device
from pathgen.models.engine import FINISH_LENGTH, FINISH_STOP, Answer, Engine, Request
from pathgen.models.fingerprint import checkpoint_files
from pathgen.text.hygiene import clean_generated_text


DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """The engine's `dtype` setting as run: `auto` is float16 on CUDA and float64 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float64
    if name not in DTYPES:
        raise ModelError(f"transformers engine dtype '{name}': expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class TransformersEngine(Engine):
    """A LLaVA model answering one text prompt per image (or text only)."""

    name = "transformers"
    accepts_images = True
    can_constrain = True

    def __init__(self, settings: dict[str, Any], what: str, threads: int | None = None,
                 log_dir: str | Path | None = None):
        self.settings = settings
        self.what = what
        self.checkpoint = Path(settings["checkpoint"])
        self.batch_size = settings.get("batch_size", 8)
        checkpoint_files(self.checkpoint, what)
        self.device = resolve_device(settings.get("device", "auto"), f"{what}.device")
        self.dtype = model_dtype(settings.get("dtype", "auto"), self.device)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(self.checkpoint, local_files_only=True)
            self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
                self.checkpoint, local_files_only=True,
                dtype=self.dtype,
            ).to(self.device).eval()
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as exc:
            raise ModelError(f"cannot load {what} checkpoint {self.checkpoint} as LLaVA: {exc}") from None
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self._compiler = None
        self._grammars: dict[str, Any] = {}

    def _chat(self, prompt: str, with_image: bool) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _grammar(self, schema: dict[str, Any]):
        import xgrammar as xgr  # only when a schema is asked for

        text = json.dumps(schema, sort_keys=True)
        if text not in self._grammars:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.model.config.text_config.vocab_size)
                self._compiler = xgr.GrammarCompiler(info)
            self._grammars[text] = self._compiler.compile_json_schema(text)
        return self._grammars[text]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        """Answers in order. A batch mixing images and text-only, or schema and free requests, is split."""
        answers: list[Answer | None] = [None] * len(requests)
        groups: dict[tuple[bool, bool, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.image is not None, r.schema is not None, r.max_tokens), []).append(i)
        for (with_image, constrained, max_tokens), indices in groups.items():
            for i, answer in zip(indices, self._generate([requests[i] for i in indices], with_image, constrained,
                                                         max_tokens)):
                answers[i] = answer
        return answers  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, requests: list[Request], with_image: bool, constrained: bool, max_tokens: int) -> list[Answer]:
        texts = [self._chat(r.prompt, with_image) for r in requests]
        if with_image:
            pictures = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in requests]  # type: ignore[arg-type]
            inputs = self.processor(images=pictures, text=texts, return_tensors="pt", padding=True)
        else:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        extra: dict[str, Any] = {}
        if constrained:
            import xgrammar as xgr

            grammars = [self._grammar(r.schema) for r in requests]  # type: ignore[arg-type]
            extra["logits_processor"] = [xgr.contrib.hf.LogitsProcessor(grammars)]
        output = self.model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            do_sample=self.settings.get("do_sample", False),
            pad_token_id=self.tokenizer.pad_token_id,
            **extra,
        )
        new = output[:, inputs["input_ids"].shape[1]:]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        answers = []
        for row, n_prompt in zip(new.tolist(), prompt_tokens):
            stop = next((i for i, tok in enumerate(row) if tok in eos_ids), None)
            kept = row if stop is None else row[:stop]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            answers.append(Answer(
                text=clean_generated_text(text),
                finish=FINISH_STOP if stop is not None else FINISH_LENGTH,
                prompt_tokens=int(n_prompt),
                completion_tokens=len(kept) + (stop is not None),
                constrained=constrained,
            ))
        return answers
