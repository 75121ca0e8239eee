"""Feature browser: a local web app over one or more analysis artifacts (`serve`), read-only
unless given a `LiveModel` (the image page's edit panel), and the same pages as static files
that open without a server (`export_static`)."""

from visae.viewer.export import export_static
from visae.viewer.live import LiveModel
from visae.viewer.server import make_server, serve

__all__ = ["LiveModel", "export_static", "make_server", "serve"]
