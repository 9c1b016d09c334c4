"""Export to LiteRT: our custom ops for torch + litert-torch, the static graphs, the exporter."""
