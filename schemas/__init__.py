"""Contracts shared by devicegate's control plane and data plane.

Settings, the auth event with its canonical encoding and hash, reason codes, API models,
the topic policy document, notification payloads, telemetry names, SQL migrations and the
generated JSON Schemas. This package imports neither ``gateway`` nor ``provisioning``: it is
what both agree on, and a test fails on such an import.
"""
