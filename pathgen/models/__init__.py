"""Models: device choice, the retrieval CLIP (open_clip), the generation engines behind one interface
(engine.py: transformers LLaVA, llama.cpp GGUF, an OpenAI-compatible server client that can launch its
own server) and checkpoint fingerprints.

What a model step needs to call a model lives here; prompts, parsing and output tables stay in the step.
"""
