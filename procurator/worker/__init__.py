"""procurator.worker."""
