"""Examples built on the library: each folder is a complete use of it (examples/demo: the main job)."""
