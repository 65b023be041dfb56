"""modelyard component."""
