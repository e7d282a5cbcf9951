"""Configuration: Kconfig -> one typed, frozen Config; presets, overrides, matrix sweeps, pinned values."""
