"""Hugging Face interop: one small file per model family mapping configs and weight names onto moekit's layers."""
