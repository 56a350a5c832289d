"""The Ray Serve entry point of the mapping service (a thin shell over :mod:`atlas.service`)."""
