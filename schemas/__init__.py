"""Contracts shared by devicegate's control plane and data plane.

This package imports neither ``gateway`` nor ``provisioning``: it is what both agree on.
"""
