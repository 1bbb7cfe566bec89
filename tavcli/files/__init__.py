"""Files: atomic writes and content hashes, for the store and for model folders."""
