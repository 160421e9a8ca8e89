"""Real-scale path: LLaVA-format data, local weights, HF Trainer / DeepSpeed training, lmms-eval evaluation."""
