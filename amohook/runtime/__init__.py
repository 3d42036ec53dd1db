"""What runs: the supervisor that `amohook serve` and `amohook worker` start (``supervisor``)."""
