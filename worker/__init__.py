"""LVPNet Archive worker: compresses received instances in the background (imports the codec)."""
