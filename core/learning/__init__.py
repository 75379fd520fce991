"""The model and everything around it: config, data, training, evaluation, baselines, ablation, inference."""
