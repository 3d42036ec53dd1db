"""The command line: thin commands over the library. Entry point: ``amohook.cli.app:main``."""
