"""Container image templates and the image builder."""
