"""Test doubles that talk real HTTP. ``fake_amo`` is a pytest fixture: import it into a conftest
(``from tests.fakes import fake_amo``) or a test module to use it."""

from tests.fakes.amocrm import FakeAmo, Fault, RecordedRequest

__all__ = ["FakeAmo", "Fault", "RecordedRequest", "fake_amo"]

try:
    import pytest
except ImportError:  # the fake itself needs only the standard library
    pass
else:
    @pytest.fixture
    def fake_amo():
        """A started FakeAmo with default settings; stopped after the test."""
        with FakeAmo() as fake:
            yield fake
            assert not fake.errors, "FakeAmo hit an internal error:\n" + "\n".join(fake.errors)
