"""Tasks and data: the synthetic and text tasks, SST-2 in MeZO's protocol, local tokenizers."""
