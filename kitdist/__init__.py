"""kitdist: distributed, fault-tolerant training of KiT, the k-NN image transformer for image restoration.

Importing the package has no side effects; subpackages are imported by name (`kitdist.model`, ...).
"""

__version__ = "0.1.0"
