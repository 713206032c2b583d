"""Route topics must exist before a taxonomy that sends to them goes live.

At start-up `require_route_topics` (consumers/publisher.py) stops the worker;
for a taxonomy that arrives later (an edited file, the taxonomies topic) the
reloader asks this check first, so a missing topic rejects that one document
and the live version keeps serving, instead of every worker crash-looping on
a send that can never complete.
"""

from __future__ import annotations

import threading

from kafka import KafkaConsumer
from kafka.errors import KafkaError

from consumers.kafka_clients import build_reader
from consumers.publisher import missing_route_topics
from pipeline.config import KafkaSettings
from pipeline.errors import TaxonomyError
from pipeline.taxonomy import Taxonomy


class RouteTopicCheck:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._consumer: KafkaConsumer | None = None
        # The file watcher and the topic feed call this from their own threads.
        self._lock = threading.Lock()

    def __call__(self, taxonomy: Taxonomy) -> None:
        """Raise TaxonomyError naming each missing route topic; nothing to do without routes."""
        if not taxonomy.route_table.rules:
            return
        with self._lock:
            existing = self._existing_topics()
        missing = missing_route_topics(existing, taxonomy)
        if missing:
            raise TaxonomyError(f"route topics do not exist: {'; '.join(missing)}; create them first",
                                code="taxonomy.route_topic_missing")

    def _existing_topics(self) -> set[str]:
        try:
            if self._consumer is None:
                self._consumer = build_reader(self._settings, "route-topics")
            return set(self._consumer.topics())
        except KafkaError as exc:
            raise TaxonomyError(f"could not list topics to check the route topics: {exc}",
                                code="taxonomy.route_topic_check_failed") from exc

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
