"""``python -m neurospec`` (also what ``torchrun -m neurospec record ...`` runs on every rank)."""

from neurospec.cli import main

main()
