"""`geotoken serve`: the HTTP API and the web page with a map (see `geotoken.serve.app`)."""

from geotoken.serve.app import ServeConfig, create_app
from geotoken.serve.runner import Busy, Runner, ServiceRate, ShuttingDown, warm_up

__all__ = ["Busy", "Runner", "ServeConfig", "ServiceRate", "ShuttingDown", "create_app", "warm_up"]
