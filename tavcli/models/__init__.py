"""Models: names, where a model is, loading its components, the hub, single files, the built-in tiny
model, LoRAs."""
