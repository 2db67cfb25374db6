"""Text that several steps share: sentence splitting, hygiene for model output, CLIP token counts, and
the attribute table of tissue sites.

Pure functions of their input (no models loaded, no files written).
"""
