"""Loading, tokenizing and serving data."""
