"""``python -m ezpq_mgr`` runs the ``ezpq`` command."""

from .cli import main

main()
