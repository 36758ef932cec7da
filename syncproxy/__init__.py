"""syncproxy: an HTTP/1.1-only TLS front end with the bundled Anki sync server."""

__version__ = "0.1.0"
