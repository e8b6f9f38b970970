"""Working with a base pipeline through its family's backbone: sampling from it (sampling.py), planning a
training run's memory on it (plan.py), learnable soft tokens in its text encoders (soft_tokens.py), and
which concepts a model knows (concept_worlds.py). Above core/ and backbones/, below everything that
trains, loads or measures patches."""
