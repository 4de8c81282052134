"""Data: inputs, audio, shards, stage plans and loading."""
