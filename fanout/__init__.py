"""Fan-out: the internal envelope, Kafka plumbing, routing, sequencing and the workers.

Imports `storage` only; the gateway imports this package, never the other way round.
"""
