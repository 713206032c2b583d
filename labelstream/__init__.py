"""labelstream: the command line and the wiring of the engine to Kafka."""

__version__ = "0.1.0"
