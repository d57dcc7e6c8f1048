"""procurator.master."""
