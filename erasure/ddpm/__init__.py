"""The class-conditional DDPM path: base model, judge classifier, erasure methods, evaluation, demo."""
