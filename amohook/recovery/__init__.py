"""Never missing a change: what amoCRM's events log knows that no webhook told, and the hooks themselves.

``reconcile`` reads the events log and queues what amohook has not seen; ``identity`` joins the
sightings of one lead change that arrive by different ways, so it has one effect; ``watchdog``
notices a webhook destination amoCRM switched off and switches it on.
"""
