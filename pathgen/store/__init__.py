"""Storage: deterministic atomic writers, the embeddings store (Zarr), the item cache, the slide
manifest, shards and pair keys, patch tars, dataset file names, table checks and seeds.

The contracts between steps live here; no step logic and no models.
"""
