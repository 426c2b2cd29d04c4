"""Shared by every workload: the run context, table schemas and storage, availability probing, local data, the config base."""
