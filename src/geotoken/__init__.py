"""GeoToken: worldwide image geolocalization by next-token prediction over hierarchical S2 cells."""

__version__ = "0.1.0"

# Precision names used everywhere (`geotoken.model.precision`): fp32, or bf16 autocast. Here, not in
# geotoken.model, so the command line can offer them without importing torch.
DTYPES = ("fp32", "bf16")
