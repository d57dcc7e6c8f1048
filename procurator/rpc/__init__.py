"""procurator.rpc."""
