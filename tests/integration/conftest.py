"""Fixtures shared by the integration tests."""

from tests.integration.pki import pki  # noqa: F401  (the TLS material fixture)
