"""Small reusable layers shared by both models (bounded scales, attention helpers)."""
