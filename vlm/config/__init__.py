"""Typed YAML configuration with strict keys and helpful errors."""
