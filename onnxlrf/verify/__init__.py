"""Verification: disjoint splits, and the back-off that checks plans on validation data."""
