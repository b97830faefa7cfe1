"""labpipe: the lab's reproducible research pipeline."""
