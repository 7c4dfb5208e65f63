"""The demo: the OpenMoji corpus of `mmscale shards demo` and the toy VIRAL teacher trained on it."""
