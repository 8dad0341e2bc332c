"""int4 grids: the (codes, scale, minimum) form a GGUF Q4_1 model is stored in, trained and exported exactly."""
