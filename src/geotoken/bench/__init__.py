"""Benchmark bodies: plain functions that time one thing and return the figures as a dict.

One module per benchmark (`tokens`, `decode`, `train`, `index`, `extract`, `earthviews`); `reference` holds
the re-implementation of the authors' training step that `train` times side by side. `geotoken bench ...`
and the scripts in `benchmarks/` are thin layers over these functions that parse flags and print.
"""
