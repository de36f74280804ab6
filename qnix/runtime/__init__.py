"""Effects on the host: every subprocess, namespace, nft table and mount lives here."""
