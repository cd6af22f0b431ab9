"""llm-worker-rbee: serves one model through llama.cpp over HTTP."""

__version__ = "0.1.0"
