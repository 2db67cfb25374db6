"""The large multimodal model backend: LLaVA through transformers (HF format).

PathGen-LLaVA_desp and the revise agent are LLaVA-1.5 models; converted to
Hugging Face format they load as `LlavaForConditionalGeneration` + processor.
Generation is batched with left padding and greedy unless configured.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image

from pathgen.errors import ModelError
from pathgen.models.device import resolve_device
from pathgen.models.fingerprint import agent_fingerprint, checkpoint_files
from pathgen.text.hygiene import clean_generated_text


class LlavaAgent:
    """A LLaVA model answering one text prompt per image."""

    backend = "transformers"

    def __init__(self, checkpoint: str | Path, settings: dict[str, Any], what: str):
        self.checkpoint = Path(checkpoint)
        self.settings = settings
        checkpoint_files(self.checkpoint, what)
        self.fingerprint = agent_fingerprint(self.backend, transformers.__version__, self.checkpoint,
                                             {k: v for k, v in settings.items() if k not in ("device", "batch_size")},
                                             what)
        self.device = resolve_device(settings.get("device", "auto"), f"{what}.device")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(self.checkpoint, local_files_only=True)
            self.model = transformers.LlavaForConditionalGeneration.from_pretrained(
                self.checkpoint, local_files_only=True,
                dtype=torch.float16 if self.device.type == "cuda" else torch.float32,
            ).to(self.device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load {what} checkpoint {self.checkpoint} as LLaVA: {exc}") from None
        self.processor.tokenizer.padding_side = "left"

    def _chat(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(self, images: list[bytes], prompts: list[str]) -> list[str]:
        """One answer per (encoded image, prompt) pair, in order."""
        if not images:
            return []
        pictures = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        inputs = self.processor(images=pictures, text=[self._chat(p) for p in prompts], return_tensors="pt",
                                padding=True).to(self.device)
        tokenizer = self.processor.tokenizer
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.settings["max_new_tokens"],
            do_sample=self.settings.get("do_sample", False),
            pad_token_id=tokenizer.pad_token_id,
        )
        answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [clean_generated_text(a) for a in answers]
