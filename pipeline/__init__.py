"""The labeling engine: config, fetch, decode, batching, model, taxonomy, classifier.

Nothing in this package knows about Kafka, so the worker, `labelstream classify`
and later the HTTP API all run the very same code.
"""
