"""Helpers that know nothing of training: durable writes of files and folders, hashes, CLI options."""
