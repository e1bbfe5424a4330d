"""Worker-side logic: cache workers (arq) and batch workers (Redis streams)."""
