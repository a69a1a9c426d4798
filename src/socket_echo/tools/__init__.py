"""Client tools: ``client``, ``probe`` and ``bench``, over one connecting/verifying layer."""
