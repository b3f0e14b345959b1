"""The packaged recipes: this folder is installed as ``sgdph_tools.recipes`` (see pyproject.toml), so
the wheel carries the same files the repository holds. ``sgdph recipes list`` shows them."""
