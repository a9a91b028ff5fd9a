"""Speculative drafting: draft sources, the exact acceptance rules, and the draft head module."""
