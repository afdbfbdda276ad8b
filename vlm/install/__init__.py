"""Install-time tooling (runs before the package itself may import)."""
