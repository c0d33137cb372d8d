"""The names of the core's sweep methods, importable without torch (configuration checks use them)."""

SWEEP_METHODS = ("hesscale", "hesscale_gn", "bl89")
