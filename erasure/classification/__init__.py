"""Classification unlearning (SalUn and its baselines on ResNet-18 / CIFAR-10).

``erasure unlearn-classifier -c CONFIG`` runs the whole table; see :mod:`erasure.classification.pipeline`.
"""
