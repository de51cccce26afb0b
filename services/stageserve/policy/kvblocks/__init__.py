"""Paged KV block accounting: allocation, reference counts and prefix hashing."""
