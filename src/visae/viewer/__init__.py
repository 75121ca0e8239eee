"""Feature browser: a read-only local web app over one or more analysis artifacts (`serve`),
and the same pages as static files that open without a server (`export_static`)."""

from visae.viewer.export import export_static
from visae.viewer.server import make_server, serve

__all__ = ["export_static", "make_server", "serve"]
