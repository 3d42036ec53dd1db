"""Moved to ``amohook.rules.handler``; this name stays for code that imports it from here."""

from amohook.rules.handler import RulesHandler, with_lead_state

__all__ = ["RulesHandler", "with_lead_state"]
