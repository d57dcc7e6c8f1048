"""procurator.nix."""
