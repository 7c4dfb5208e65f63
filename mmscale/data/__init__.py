"""Data: shards, samples, tokenizer, image transforms and the resumable, packing loader."""
