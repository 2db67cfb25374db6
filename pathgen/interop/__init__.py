"""Interchange with outside formats: the released PathGen-1.6M JSON (reading and writing it, importing it
from local slides) and GDC downloads of TCGA slides (the slide manifest from a sample sheet)."""
