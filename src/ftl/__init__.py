"""ftl: from raw questions to a fast int4 model on a CPU, through Olive and onnxruntime-genai."""

__version__ = "0.1.0"
