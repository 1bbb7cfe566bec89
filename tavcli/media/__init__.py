"""Media files: reading and writing clips, frames and pictures."""
