"""GeoToken: worldwide image geolocalization by next-token prediction over hierarchical S2 cells."""

__version__ = "0.1.0"
