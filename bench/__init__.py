"""Benchmarks and test doubles for qna-gateway."""
