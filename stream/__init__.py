"""Kafka I/O, the event schema, micro-batching, producers (synthetic and replay) and the consumer loop."""
