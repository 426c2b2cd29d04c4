"""Everything Ray: sweep files, Tune/Train wiring, storage, aggregation, reports, queries. Never builds a model."""
