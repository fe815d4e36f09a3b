"""The toolkit from the Hugging Face stack: a ``transformers.Trainer`` whose step is the ZO engine."""
