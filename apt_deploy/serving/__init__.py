"""Serving (L4): predict from an artifact, Triton model repositories, a local Triton server, load tests."""
