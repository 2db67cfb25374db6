"""PathGen builder: whole-slide images to pathology image-caption datasets.

Each pipeline step is one module with one public function; `pathgen.cli`
exposes them as `pathgen <step>` for Snakemake rules and DVC stages alike.
"""

__version__ = "0.1.0"
