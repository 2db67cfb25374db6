"""Pipeline steps, one module each: tile, embed, prompts, select, patches, caption, revise, summarize, assemble.

A step module holds its `run_*` function and what only that step uses. Steps never import each other:
what two steps share lives in `pathgen.wsi`, `pathgen.models`, `pathgen.text` or `pathgen.store`, so a
step's code hash (`pathgen.lineage.codehash`) follows only the code its output depends on.
"""
