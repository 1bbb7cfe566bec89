"""The project store: entries keyed by what determines them, their payloads, checkpoints, sidecars and
housekeeping. Free of torch at import."""
