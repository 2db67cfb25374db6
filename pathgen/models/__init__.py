"""Models: device choice, the retrieval CLIP (open_clip), the generation backends (transformers LLaVA,
llama.cpp GGUF) and agent fingerprints.

What a model step needs to call a model lives here; prompts, parsing and output tables stay in the step.
"""
