"""Benchmarks against peer runtimes (llama.cpp) on the same decoder shapes."""
