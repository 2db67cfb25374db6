"""PathGen builder: whole-slide images to pathology image-caption datasets.

One subpackage per concern: `steps` (one module per pipeline step), the shared
`wsi`, `models`, `text` and `store`, and around them `lineage`, `reporting`,
`interop` and `demo`. `pathgen.cli` exposes the steps as `pathgen <step>` for
Snakemake rules and DVC stages alike, and is the only module that imports them all.
"""

__version__ = "0.1.0"
