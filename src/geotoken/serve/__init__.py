"""`geotoken serve`: the HTTP API and the web page with a map (see `geotoken.serve.app`)."""

from geotoken.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
