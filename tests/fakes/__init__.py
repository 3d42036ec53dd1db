"""Test doubles that talk real HTTP. The pytest fixture for the fake amoCRM is ``fake`` in
tests/conftest.py."""

from tests.fakes.amocrm import FakeAmo, Fault, RecordedRequest

__all__ = ["FakeAmo", "Fault", "RecordedRequest"]
