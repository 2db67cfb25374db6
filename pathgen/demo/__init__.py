"""The offline demo: synthetic H&E slides, the tiny models with the real architectures, and the calibration
of the tiny CLIP. Nothing in a step imports it: a real build never runs demo code.
"""
