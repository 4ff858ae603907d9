"""Operator tools: the commands that talk to the API (send, status, dead) and the
all-in-one local stack (``echo-at-time up``) with the servers it starts."""
