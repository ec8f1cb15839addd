"""The admin side: an SSH shell with a documented `relay` object, and metrics."""
