"""text → tokens → embeddings → layers → trace: the model and its run."""
