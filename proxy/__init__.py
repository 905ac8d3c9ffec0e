"""authproxy: an authenticating egress proxy for OAuth 2.0 client-credentials partners."""

__version__ = "0.3.0"
