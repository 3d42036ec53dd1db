"""amohook keeps an amoCRM (Kommo) integration alive: tokens, reference data and webhooks."""

__version__ = "0.1.0"
