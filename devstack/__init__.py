"""The development stack: starts PostgreSQL, Redis and the Kafka broker for `agora services`,
the tests and the benchmarks. No runtime process imports it."""
