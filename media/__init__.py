"""Media I/O (PyAV files, images), weights (the weights folder, the Hugging Face Hub) and faces (alignment)."""
