"""Training: the DeepSpeed engine around the model, the stage loop, resumable state, logging."""
