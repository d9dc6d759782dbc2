"""Configs, DeepSpeed engines, stage recipes, the train loop, checkpoints, export, evaluation and inference."""
