"""The edgepipe cloud server: holds the middle layers of every edge's model."""
