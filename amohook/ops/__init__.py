"""The operator's console: what a person reads to see whether amohook is well, and how it is kept.

``status_page`` (``/status``) and ``metrics`` (``/metrics``) read through ``overview``, behind a
password whose failures ``throttle`` slows down; ``health``
answers ``/healthz``; ``reader`` is the one thread that reads the store for them; ``doctor`` is
`amohook doctor`; ``retention`` is what `amohook prune` and the listener's pruner delete.
"""
