"""The Kafka-facing side: the consume loop, producers, offsets, commits."""
