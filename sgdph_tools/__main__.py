"""``python -m sgdph_tools ...`` is the ``sgdph`` command (torchrun launches it this way)."""

from .cli import main

main()
