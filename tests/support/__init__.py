"""Helpers shared by tests and tools (processes to start, clients to build)."""
