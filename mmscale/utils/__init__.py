"""Helpers that know nothing of training: durable, atomic writes of files and folders, and streaming hashes."""
