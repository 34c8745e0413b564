"""Fixtures of the server tests (see server.py): the servers are real processes, one per module."""
from tests.serve.server import tiny_server  # noqa: F401
