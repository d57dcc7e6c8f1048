"""procurator.worker.vmm."""
