"""Write a planned model: GGUF through llama.cpp's own quantizer (gguf.py)."""
