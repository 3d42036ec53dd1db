"""Talking to amoCRM: the token endpoint (oauth) and the API v4 client."""
