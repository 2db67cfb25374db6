"""The released PathGen-1.6M JSON format: reading and writing it, and importing it from local slides."""
