"""amoCRM webhooks: parsing the POSTed body into events (``parse``)."""
