"""Example edit-harness plugin (see pyproject.toml for how it is plugged in)."""
