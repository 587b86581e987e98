"""HBONE tests (issue 5): interop, multiplexing, abuse, pooling, netns nodes."""
