"""Runs TRL's own trainer test files against trl and fusedrl, offline, on generated stand-ins (README.md here)."""
