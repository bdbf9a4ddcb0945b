"""I/O at the edges: video files, caches, checkpoints."""
